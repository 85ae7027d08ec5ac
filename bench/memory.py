"""Worker memory: RSS idle and under a drain, started as bench.pgqueuer_compare starts our side
(`python -m pgnotify_worker run`, the webhook provider, every request signed, every attempt in
pgnotify.events). Each run is a fresh worker process; medians over the runs.

    python -m bench.memory                   # 5 runs: idle, then a 25,000-row drain
    python -m bench.memory --rows 1000000 --runs 1 --sample 10   # RSS along a 1M drain
    python -m bench.memory --smoke           # seconds; figures not meaningful

Idle is read once /readyz answers and the worker has sat 3 s with an empty queue; peak is the
highest RSS seen (every 0.1 s) from the first INSERT of the backlog (100,000-row slices) until the
receiver has every row; after is RSS 3 s later. The rate counts from the first INSERT.
/proc/PID/smaps_rollup splits idle RSS into anonymous (the heap: objects, arenas) and file-backed
(shared libraries, extension modules) pages.
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import DURABLE, SECRET, cpu_seconds, machine, rss_mb, sink_count, wait_http
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port


@dataclass
class Run:
    idle_mb: float = 0.0
    anon_mb: float = 0.0
    file_mb: float = 0.0
    peak_mb: float = 0.0
    after_mb: float = 0.0
    peak_anon_mb: float = 0.0
    threads: int = 0  # most threads seen during the drain
    per_second: float = 0.0
    worker_us: float = 0.0  # worker CPU per notification during the drain
    samples: list[tuple[int, float]] = field(default_factory=list)  # (delivered, RSS MB)


def smaps(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup in MB (Rss, Anonymous, Private_Dirty, Shared_Clean, ...)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) / 1024
    return out


def threads(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/task"))
    return 0


def worker_env(dsn: str, sink_port: int, http_port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_CHANNEL_CONCURRENCY": "webhook=50",
        "PGNOTIFY_DESTINATION_CONCURRENCY": "50",
        "PGNOTIFY_WEBHOOK_SECRET": SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": str(http_port),
        "PGNOTIFY_LOG_LEVEL": "WARNING",
        "PGNOTIFY_QUEUE_METRICS_INTERVAL": "5",
        **extra,
    }


async def insert(conn: asyncpg.Connection, url: str, rows: int) -> None:
    for start in range(0, rows, 100_000):  # a 1M backlog in slices: one huge statement is slow
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series($2::int, $3::int) g",
            url,
            start + 1,
            min(rows, start + 100_000),
        )


async def one_run(
    dsn: str,
    conn: asyncpg.Connection,
    rows: int,
    extra: dict[str, str],
    sample_s: float,
    host: str = "127.0.0.1",
) -> Run:
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgnotify_worker", "run"],
        env=worker_env(dsn, sink_port, http_port, extra),
        stdout=subprocess.DEVNULL,
    )
    run = Run()
    try:
        await wait_http(f"http://127.0.0.1:{sink_port}/count")
        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
        await asyncio.sleep(3)
        run.idle_mb = rss_mb(worker.pid)
        rollup = smaps(worker.pid)
        run.anon_mb = rollup.get("Anonymous", 0.0)
        run.file_mb = rollup.get("Rss", 0.0) - run.anon_mb
        async with aiohttp.ClientSession() as http:
            cpu = cpu_seconds([worker.pid])
            started = time.monotonic()
            # RSS is watched from the first INSERT on: the worker drains while the slices land
            inserting = asyncio.create_task(insert(conn, f"http://{host}:{sink_port}/hook", rows))
            run.peak_mb, last_sample, count = run.idle_mb, 0.0, 0
            async with asyncio.timeout(3600):
                while count < rows or not inserting.done():
                    count = await sink_count(http, sink_port)
                    rss = rss_mb(worker.pid)
                    if rss > run.peak_mb:
                        run.peak_mb = rss
                        run.peak_anon_mb = smaps(worker.pid).get("Anonymous", 0.0)
                    run.threads = max(run.threads, threads(worker.pid))
                    if sample_s and time.monotonic() - last_sample >= sample_s:
                        run.samples.append((count, rss))
                        last_sample = time.monotonic()
                    await asyncio.sleep(0.1)
            await inserting
            run.per_second = rows / (time.monotonic() - started)
            run.worker_us = 1e6 * (cpu_seconds([worker.pid]) - cpu) / rows
            await asyncio.sleep(3)
            run.after_mb = rss_mb(worker.pid)
    finally:
        worker.terminate()
        sink.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(30)
        sink.wait(10)
        await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
    return run


async def bench(
    runs: int, rows: int, extra: dict[str, str], sample_s: float, host: str = "127.0.0.1"
) -> list[Run]:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE bench")
        await admin.execute(
            "ALTER DATABASE bench SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        await admin.close()
        dsn = cluster.dsn().rpartition("/")[0] + "/bench"
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        results = []
        for i in range(runs):
            results.append(await one_run(dsn, conn, rows, extra, sample_s, host))
            r = results[-1]
            print(
                f"run {i + 1}: idle {r.idle_mb:.1f} MB (anon {r.anon_mb:.1f}, file {r.file_mb:.1f})"
                f", peak {r.peak_mb:.1f} (anon {r.peak_anon_mb:.1f}, {r.threads} threads)"
                f", after {r.after_mb:.1f}, {r.per_second:,.0f}/s, {r.worker_us:.0f} µs CPU each",
                flush=True,
            )
        await conn.close()
        return results
    finally:
        cluster.destroy()


def report(results: list[Run], rows: int, extra: dict[str, str]) -> str:
    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results))

    lines = [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- worker: `python -m pgnotify_worker run`, webhook, concurrency 50, signed; "
        f"{len(results)} run(s), a fresh process each, {rows:,}-row drain"
        + (f"; env {' '.join(f'{k}={v}' for k, v in extra.items())}" if extra else ""),
        "",
        "| idle MB | anon / file MB | peak under the drain MB | 3 s after MB | drain /s "
        "| worker CPU µs/notification |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {med('idle_mb'):.1f} | {med('anon_mb'):.1f} / {med('file_mb'):.1f} "
        f"| {med('peak_mb'):.1f} | {med('after_mb'):.1f} | {med('per_second'):,.0f} "
        f"| {med('worker_us'):.0f} |",
    ]
    samples = [s for r in results for s in r.samples]
    if samples:
        lines += ["", "| delivered | RSS MB |", "|---:|---:|"]
        lines += [f"| {n:,} | {mb:.1f} |" for n, mb in samples]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; figures not meaningful")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--sample", type=float, default=0.0, help="log RSS every N seconds")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the worker")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the receiver's host in each URL (localhost: resolved, in the executor's threads)",
    )
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    runs, rows = (1, 1_000) if args.smoke else (args.runs, args.rows)
    extra = dict(item.split("=", 1) for item in args.env)
    results = asyncio.run(bench(runs, rows, extra, args.sample, args.host))
    table = report(results, rows, extra)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
