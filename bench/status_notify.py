"""What NOTIFY pgnotify_status (schema 0018's status trigger) costs the worker's drain, side by side
in one run: the same worker drains the same backlog with the trigger disabled and enabled, in
alternating rounds (so drift on a shared machine hits both), and with a client LISTENing, as an
app would. Prints a table.

    python -m bench.status_notify            # 3 rounds each, 20,000 rows
    python -m bench.status_notify --smoke    # seconds; numbers are not meaningful
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import DURABLE, SECRET, Plan, machine, measure_drain, postgres_pids, wait_http
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port

TRIGGER = "notifications_statuses_changed"  # schema 0023 (a statement trigger)


async def run(rounds: int, rows: int, concurrency: int) -> tuple[dict[str, list[float]], int]:
    cluster = TempCluster(settings=DURABLE).start()
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    worker: subprocess.Popen[bytes] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="pgnotify-bench-status-"))
    results: dict[str, list[float]] = {"off": [], "on": []}
    heard = 0
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
        env = {
            **os.environ,
            "PGNOTIFY_DATABASE_URL": dsn,
            "PGNOTIFY_CHANNELS": "webhook",
            "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={concurrency}",
            "PGNOTIFY_DESTINATION_CONCURRENCY": str(concurrency),
            "PGNOTIFY_WEBHOOK_SECRET": SECRET,
            "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "PGNOTIFY_HTTP_HOST": "127.0.0.1",
            "PGNOTIFY_HTTP_PORT": str(http_port),
            "PGNOTIFY_LOG_LEVEL": "WARNING",
            "PGNOTIFY_QUEUE_METRICS_INTERVAL": "5",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgnotify_worker", "run"], env=env, stdout=subprocess.DEVNULL
        )
        await wait_http(f"http://127.0.0.1:{sink_port}/stats")
        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
        pids = {"worker": [worker.pid], "sink": [sink.pid], "postgres": postgres_pids(cluster)}
        plan = Plan(drain_rows=rows)
        async with aiohttp.ClientSession() as http:
            for _ in range(rounds):
                for mode in ("off", "on"):
                    verb = "DISABLE" if mode == "off" else "ENABLE"
                    await conn.execute(
                        f"ALTER TABLE pgnotify.notifications {verb} TRIGGER {TRIGGER}"
                    )
                    drained = await measure_drain(conn, http, sink_port, pids, plan)
                    results[mode].append(drained["per_second"])
        heard = counted[0]
        await listener.close()
        await conn.close()
    finally:
        for proc in (worker, sink):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
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
    off, on = med(results["off"]), med(results["on"])
    lines = ["## NOTIFY pgnotify_status: cost on the worker's drain", ""]
    lines += [f"- {key}: {value}" for key, value in machine().items()]
    lines += [
        f"- {rows:,} webhook rows per drain, concurrency {args.concurrency}, one worker, "
        f"{rounds} rounds alternating trigger off / on; one client LISTENing (heard {heard:,})",
        "",
        "| status trigger | notifications/s per round | median |",
        "|---|---|---:|",
        f"| disabled | {', '.join(f'{v:,.0f}' for v in results['off'])} | {off:,.0f} |",
        f"| enabled | {', '.join(f'{v:,.0f}' for v in results['on'])} | {on:,.0f} |",
        "",
        f"Enabled / disabled: **{on / off:.2f}** (same run, same worker, same backlog).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
