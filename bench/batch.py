"""Batch sends for broadcasts (delivery/batch.py): a backlog of emails through the fake Resend
and of in-app messages, drained by a worker process with batching on and off, runs interleaved
in one session. Prints notifications/s (commit of the backlog to the last row `sent`), the
worker's CPU per notification and the provider requests made. Not a test.

    python -m bench.batch            # 20,000 emails / 50,000 in-app rows, 3 runs each
    python -m bench.batch --smoke    # a few seconds; numbers are not meaningful
    python -m bench.batch --serve-resend   # (internal) a fake Resend in its own process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.run import DURABLE, cpu_seconds, machine, postgres_pids, wait_http
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port

RESEND_KEY = "re_bench_batch"


@dataclass(frozen=True)
class Scenario:
    name: str
    channel: str
    batching: str  # PGNOTIFY_BATCH_PROVIDERS


SCENARIOS = (
    Scenario("email via Resend, batch", "email", "resend"),
    Scenario("email via Resend, one request each", "email", ""),
    Scenario("in-app, set-based batch", "inapp", "inapp"),
    Scenario("in-app, one INSERT each", "inapp", ""),
)


@dataclass(frozen=True)
class Run:
    per_second: float
    worker_us: float  # CPU µs per notification
    postgres_us: float
    fake_us: float
    requests: int


@dataclass
class Plan:
    email_rows: int = 20_000
    inapp_rows: int = 50_000
    runs: int = 3


SMOKE = Plan(email_rows=400, inapp_rows=1_000, runs=1)


async def serve_resend() -> None:
    """A fake Resend in this process; prints its URL and its request count on demand."""
    from tests.fakes.resend import FakeResend

    async with FakeResend(RESEND_KEY) as fake:
        print(fake.url, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"count":
                batch = sum(1 for r in fake.requests if r.path == "/emails/batch")
                print(f"{len(fake.requests)} {batch} {len(fake.sent)}", flush=True)
                fake.requests.clear()  # memory: a long run records every request
                fake.sent.clear()
                fake.sent_ids.clear()
                fake.idempotency.clear()
                fake.batch_idempotency.clear()


async def fill(conn: asyncpg.Connection, channel: str, count: int) -> None:
    """The backlog, in one transaction (the worker sees it at once)."""
    if channel == "email":
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, payload) "
            "SELECT 'email', 'reader' || g || '@example.com', 'News {{ n }}', "
            "'Hello, reader {{ n }}: this week in the project.', jsonb_build_object('n', g) "
            "FROM generate_series(1, $1) g",
            count,
        )
    else:
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, category, "
            "payload) SELECT 'inapp', 'user-' || g, 'News {{ n }}', 'Hello {{ n }}', 'news', "
            "jsonb_build_object('n', g) FROM generate_series(1, $1) g",
            count,
        )


async def drain(
    conn: asyncpg.Connection,
    channel: str,
    count: int,
    pids: dict[str, list[int]],
    timeout: float = 600,
) -> tuple[float, dict[str, float]]:
    """(notifications/s, CPU µs per notification of each process group) from the backlog's
    commit to the last row sent."""
    cpu_before = {name: cpu_seconds(group) for name, group in pids.items()}
    await fill(conn, channel, count)
    started = time.perf_counter()
    while await conn.fetchval(  # stops at the first unsent row: cheap beside the drain
        "SELECT EXISTS (SELECT 1 FROM pgnotify.notifications WHERE status <> 'sent')"
    ):
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"rows not sent after {timeout}s")
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu = {
        name: (cpu_seconds(group) - cpu_before[name]) / count * 1e6 for name, group in pids.items()
    }
    return count / elapsed, cpu


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "TRUNCATE pgnotify.events, pgnotify.inbox, pgnotify.notifications, "
        "pgnotify.provider_limits CASCADE"
    )


def start_worker(
    dsn: str, port: int, resend_url: str, scenario: Scenario
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_CHANNELS": scenario.channel,
        "PGNOTIFY_EMAIL_PROVIDERS": "resend",
        "PGNOTIFY_RESEND_API_KEY": RESEND_KEY,
        "PGNOTIFY_RESEND_BASE_URL": resend_url,
        "PGNOTIFY_EMAIL_FROM": "Acme <news@acme.test>",
        # the fake has no limit; Resend's own (5 requests/s by default) would cap the batch
        # path at 500 emails/s and single sends at 5/s
        "PGNOTIFY_RATE_LIMITS": "resend=100000/100000",
        "PGNOTIFY_BATCH_PROVIDERS": scenario.batching,
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": str(port),
        "PGNOTIFY_LOG_LEVEL": "WARNING",
        "PGNOTIFY_QUEUE_METRICS_INTERVAL": "5",
    }
    profile = os.environ.get("BENCH_PROFILE")  # a directory: cProfile each worker into it
    wrap = (
        [
            "-m",
            "cProfile",
            "-o",
            f"{profile}/{scenario.channel}-{scenario.batching or 'single'}.prof",
        ]
        if profile
        else []
    )
    return subprocess.Popen(
        [sys.executable, *wrap, "-m", "pgnotify_worker", "run"], env=env, stdout=subprocess.DEVNULL
    )


def ask_count(fake: subprocess.Popen[str]) -> tuple[int, int, int]:
    assert fake.stdin is not None and fake.stdout is not None
    fake.stdin.write("count\n")
    fake.stdin.flush()
    total, batch, sent = fake.stdout.readline().split()
    return int(total), int(batch), int(sent)


async def bench(
    plan: Plan, dsn: str | None, only: str | None = None
) -> tuple[dict[str, list[Run]], dict[str, str]]:
    cluster = None
    if dsn is None:
        cluster = TempCluster(settings=DURABLE).start()
        admin_dsn = cluster.dsn()
    else:
        admin_dsn = dsn
    name = f"pgnotify_bench_batch_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    version = await admin.fetchval("SHOW server_version")
    bench_dsn = f"{admin_dsn.rpartition('/')[0]}/{name}"
    fake = subprocess.Popen(
        [sys.executable, "-m", "bench.batch", "--serve-resend"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[Run]] = {s.name: [] for s in SCENARIOS}
    try:
        assert fake.stdout is not None
        resend_url = fake.stdout.readline().strip()
        conn = await asyncpg.connect(bench_dsn)
        await migrate.migrate(conn)
        for _ in range(plan.runs):
            for scenario in SCENARIOS:  # interleaved: the host's noise falls on every scenario
                if only and scenario.channel != only:
                    continue
                await reset(conn)
                ask_count(fake)
                port = free_port()
                worker = start_worker(bench_dsn, port, resend_url, scenario)
                try:
                    await wait_http(f"http://127.0.0.1:{port}/readyz")
                    rows = plan.email_rows if scenario.channel == "email" else plan.inapp_rows
                    pids = {
                        "worker": [worker.pid],
                        "postgres": postgres_pids(cluster),  # after the worker connected
                        "fake": [fake.pid],
                    }
                    rate, cpu = await drain(conn, scenario.channel, rows, pids)
                    requests, _batches, sent = ask_count(fake)
                    if scenario.channel == "email":
                        assert sent == rows, f"{sent} emails reached the fake, {rows} expected"
                    results[scenario.name].append(
                        Run(rate, cpu["worker"], cpu["postgres"], cpu["fake"], requests)
                    )
                finally:
                    worker.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        worker.wait(30)
        await conn.close()
        info = machine()
        info["postgresql"] = (
            f"{version} ({'own throwaway cluster, fsync on' if cluster else 'given server'})"
        )
    finally:
        fake.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fake.wait(10)
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if cluster is not None:
            cluster.destroy()
    return results, info


def report(results: dict[str, list[Run]], info: dict[str, str], plan: Plan) -> str:
    med = statistics.median
    lines = ["## Batch sends for broadcasts (bench.batch)", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        f"- backlog: {plan.email_rows:,} emails / {plan.inapp_rows:,} in-app rows committed at "
        f"once; {plan.runs} run(s) per scenario, interleaved; one worker process, concurrency "
        "50; the fake Resend in its own process",
        "",
        "| scenario | notifications/s (median) | runs | CPU µs per notification: worker / "
        "postgres / fake Resend | CPU-bound ceiling on 2 idle cores | provider requests / run |",
        "|---|---:|---|---|---:|---:|",
    ]
    for scenario in SCENARIOS:
        runs = results[scenario.name]
        if not runs:
            continue
        email = scenario.channel == "email"
        worker, postgres = med(r.worker_us for r in runs), med(r.postgres_us for r in runs)
        fake = med(r.fake_us for r in runs) if email else 0.0
        # the worker is one process (one core at most); the rest share what is left
        ceiling = min(1e6 / worker, 2e6 / (worker + postgres + fake))
        lines.append(
            f"| {scenario.name} | **{med(r.per_second for r in runs):,.0f}** | "
            f"{', '.join(f'{r.per_second:,.0f}' for r in runs)} | "
            f"{worker:.0f} / {postgres:.0f} / {fake:.0f} | {ceiling:,.0f} | "
            f"{f'{med(r.requests for r in runs):,.0f}' if email else '(database)'} |"
        )
    pairs = [(SCENARIOS[0], SCENARIOS[1]), (SCENARIOS[2], SCENARIOS[3])]
    lines.append("")
    for on, off in pairs:
        if results[on.name] and results[off.name]:
            ratio = med(r.per_second for r in results[on.name]) / med(
                r.per_second for r in results[off.name]
            )
            lines.append(f"- {on.name} / {off.name}: **{ratio:.2f} x** (same run)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds; not meaningful")
    parser.add_argument("--dsn", help="admin DSN of an existing server (default: throwaway)")
    parser.add_argument("--runs", type=int, help="runs per scenario")
    parser.add_argument("--only", choices=("email", "inapp"), help="only this channel's pair")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    parser.add_argument("--serve-resend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_resend:
        asyncio.run(serve_resend())
        return
    plan = SMOKE if args.smoke else Plan()
    if args.runs:
        plan.runs = args.runs
    results, info = asyncio.run(bench(plan, args.dsn, args.only))
    table = report(results, info, plan)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
