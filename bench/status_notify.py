"""What NOTIFY pgnotify_status (schema 0018's status trigger) costs the worker's drain, side by side
in one run: a worker drains the same backlog with the trigger disabled, enabled, and enabled with
the database setting pgnotify.status_notify = off (schema 0027: no NOTIFY, the status webhooks
still checked), in alternating rounds (so drift on a shared machine hits all three), with a
client LISTENing, as an app would. The worker is restarted before every drain (a database
setting reaches new sessions only), so each variant starts from the same fresh pool.
Prints a table.

    python -m bench.status_notify            # 3 rounds each, 20,000 rows
    python -m bench.status_notify --smoke    # seconds; numbers are not meaningful
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import (
    DURABLE,
    Plan,
    machine,
    measure_drain,
    postgres_pids,
    wait_http,
    webhook_worker_env,
)
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port

TRIGGER = "notifications_statuses_changed"  # schema 0023 (a statement trigger)
MODES = ("disabled", "on", "setting off")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


async def run(
    rounds: int, rows: int, concurrency: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    cluster = TempCluster(settings=DURABLE).start()
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    worker: subprocess.Popen[bytes] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="pgnotify-bench-status-"))
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    heard = dict.fromkeys(MODES, 0)
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE bench_status")
        await admin.execute(
            "ALTER DATABASE bench_status SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        await admin.close()
        dsn = cluster.dsn("bench_status")
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        listener = await asyncpg.connect(dsn)
        counted = [0]
        await listener.add_listener(
            "pgnotify_status", lambda *_: counted.__setitem__(0, counted[0] + 1)
        )
        env = webhook_worker_env(dsn, http_port, concurrency)
        await wait_http(f"http://127.0.0.1:{sink_port}/stats")
        plan = Plan(drain_rows=rows)
        async with aiohttp.ClientSession() as http:
            for _ in range(rounds):
                for mode in MODES:
                    verb = "DISABLE" if mode == "disabled" else "ENABLE"
                    await conn.execute(
                        f"ALTER TABLE pgnotify.notifications {verb} TRIGGER {TRIGGER}"
                    )
                    setting = "off" if mode == "setting off" else "DEFAULT"
                    await conn.execute(
                        f"ALTER DATABASE bench_status SET pgnotify.status_notify = {setting}"
                    )
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "pgnotify_worker", "run"],
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                    await wait_http(f"http://127.0.0.1:{http_port}/readyz")
                    pids = {
                        "worker": [worker.pid],
                        "sink": [sink.pid],
                        "postgres": postgres_pids(cluster),
                    }
                    before = counted[0]
                    drained = await measure_drain(conn, http, sink_port, pids, plan)
                    results[mode].append(drained["per_second"])
                    stop(worker)
                    worker = None
                    # a query's answer comes after the NOTIFYs committed before it
                    await listener.fetchval("SELECT 1")
                    heard[mode] += counted[0] - before
        await listener.close()
        await conn.close()
    finally:
        for proc in (worker, sink):
            if proc is not None:
                stop(proc)
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return results, heard


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; not meaningful")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rounds, rows = (1, 1_000) if args.smoke else (args.rounds, args.rows)
    results, heard = asyncio.run(run(rounds, rows, args.concurrency))
    med = statistics.median
    disabled = med(results["disabled"])
    labels = {
        "disabled": "trigger disabled",
        "on": "enabled (setting unset)",
        "setting off": "enabled, pgnotify.status_notify = off",
    }
    lines = ["## NOTIFY pgnotify_status: cost on the worker's drain", ""]
    lines += [f"- {key}: {value}" for key, value in machine().items()]
    lines += [
        f"- {rows:,} webhook rows per drain, concurrency {args.concurrency}, one worker started "
        f"afresh per drain, {rounds} rounds alternating the three variants; one client "
        "LISTENing",
        "",
        "| status trigger | notifications/s per round | median | / disabled | NOTIFYs heard |",
        "|---|---|---:|---:|---:|",
    ]
    for mode in MODES:
        rates = results[mode]
        lines.append(
            f"| {labels[mode]} | {', '.join(f'{v:,.0f}' for v in rates)} | {med(rates):,.0f} "
            f"| {med(rates) / disabled:.2f} | {heard[mode]:,} |"
        )
    lines += [
        "",
        "Same run, same backlog, alternating rounds. With the setting off the trigger still "
        "fires (it checks the setting and the status webhooks) but sends no NOTIFY.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
