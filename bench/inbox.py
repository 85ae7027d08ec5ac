"""The inbox live feed (docs/inbox.md): a worker process with thousands of open server-sent-event
streams. Measures the worker's RSS per 1,000 open streams, and with 1,000 streams of 1,000 users
open, the time from a producer's COMMIT to each stream receiving the message: one message to
every user in one transaction (fan-out), and single messages one at a time. The clients live in
this process (aiohttp), the worker in its own, PostgreSQL in a throwaway cluster. Not a test.

    python -m bench.inbox            # 1,000 and 2,000 streams, several runs each
    python -m bench.inbox --smoke    # 100 streams, seconds; never fails on a time
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from bench.run import DURABLE, cpu_seconds, machine, pct, postgres_pids, rss_mb, wait_http
from pgnotify_worker.adapters import migrate
from pgnotify_worker.core import app_tokens
from tests.support.pgcluster import TempCluster, free_port

SECRET = b"bench-inbox-secret-0123456789abcdef"


@dataclass
class Plan:
    steps: tuple[int, ...] = (1000, 2000)  # open streams at each memory reading
    streams: int = 1000  # open during the delivery runs (one user each)
    fanout_runs: int = 5
    singles: int = 200


SMOKE = Plan((50, 100), 100, 1, 20)


@dataclass
class Results:
    rss_idle_mb: float = 0.0
    rss: list[tuple[int, float]] = field(default_factory=list)  # (open streams, MB)
    fanout: list[list[float]] = field(default_factory=list)  # seconds commit -> each stream
    singles: list[float] = field(default_factory=list)
    # the same commits heard by a bare asyncpg LISTEN in this process: what the machine gives
    fanout_notify: list[float] = field(default_factory=list)  # commit -> last NOTIFY heard
    singles_notify: list[float] = field(default_factory=list)
    open_seconds: float = 0.0
    worker_cpu_per_event_us: float = 0.0
    postgres_cpu_per_event_us: float = 0.0
    clients_cpu_per_event_us: float = 0.0


class Client:
    """One EventSource-like client: counts `message` events and notes when each arrived."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.ready = asyncio.Event()
        self.arrivals: asyncio.Queue[float] = asyncio.Queue()

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        token = app_tokens.issue(SECRET, self.user, int(time.time()), 3600)
        async with http.get(
            url, params={"token": token}, timeout=aiohttp.ClientTimeout(total=None)
        ) as response:
            assert response.status == 200, response.status
            event = ""
            async for raw in response.content:
                line = raw.rstrip(b"\n")
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif not line:
                    if event == "counts":
                        self.ready.set()
                    elif event == "message":
                        self.arrivals.put_nowait(time.perf_counter())
                    event = ""


class Heard:
    """A bare LISTEN pgnotify_inbox: when the last of the expected NOTIFYs arrived."""

    def __init__(self) -> None:
        self.left = 0
        self.last = 0.0
        self.done = asyncio.Event()

    def expect(self, count: int) -> None:
        self.left = count
        self.done.clear()

    def on_notify(self, *_args: object) -> None:
        self.left -= 1
        if self.left == 0:
            self.last = time.perf_counter()
            self.done.set()


async def open_clients(
    http: aiohttp.ClientSession, url: str, clients: list[Client], tasks: list[asyncio.Task[None]]
) -> None:
    for client in clients:
        tasks.append(asyncio.create_task(client.run(http, url)))
    async with asyncio.timeout(120):
        for client in clients:
            await client.ready.wait()


async def settle(pid: int) -> float:
    """RSS once it stops moving (the allocator hands memory back lazily)."""
    last = rss_mb(pid)
    for _ in range(10):
        await asyncio.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) < 0.2:
            return now
        last = now
    return last


INSERT = """
INSERT INTO pgnotify.inbox (notification_id, user_id, category, title, body)
SELECT nextval('bench_notification_ids'), u, 'bench', 'Hello', 'A message for the bench'
FROM unnest($1::text[]) AS u
"""


async def bench(plan: Plan) -> tuple[Results, dict[str, str]]:
    results = Results()
    cluster = TempCluster(settings={**DURABLE, "max_connections": "50"}).start()
    admin = await asyncpg.connect(cluster.dsn())
    await admin.execute("CREATE DATABASE pgnotify_bench_inbox")
    version = await admin.fetchval("SHOW server_version")
    await admin.close()
    dsn = cluster.dsn("pgnotify_bench_inbox")
    port = free_port()
    worker: subprocess.Popen[bytes] | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        await conn.execute("CREATE SEQUENCE bench_notification_ids")
        env = {
            **os.environ,
            "PGNOTIFY_DATABASE_URL": dsn,
            "PGNOTIFY_CHANNELS": "inapp",
            "PGNOTIFY_APP_TOKEN_SECRET": SECRET.decode(),
            "PGNOTIFY_HTTP_HOST": "127.0.0.1",
            "PGNOTIFY_HTTP_PORT": str(port),
            "PGNOTIFY_LOG_LEVEL": "WARNING",
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgnotify_worker", "run"], env=env, stdout=subprocess.DEVNULL
        )
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        url = f"http://127.0.0.1:{port}/inbox/stream"
        results.rss_idle_mb = await settle(worker.pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            clients: list[Client] = []
            started = time.perf_counter()
            for target in plan.steps:
                more = [Client(f"user-{n}") for n in range(len(clients), target)]
                await open_clients(http, url, more, tasks)
                clients += more
                if target == plan.steps[0]:
                    results.open_seconds = time.perf_counter() - started
                results.rss.append((target, await settle(worker.pid)))
            heard = Heard()
            bare = await asyncpg.connect(dsn)
            await bare.add_listener("pgnotify_inbox", heard.on_notify)
            live = clients[: plan.streams]
            users = [c.user for c in live]
            pg = postgres_pids(cluster)
            cpu_before = cpu_seconds([worker.pid]), cpu_seconds(pg), cpu_seconds([os.getpid()])
            for _ in range(plan.fanout_runs):
                heard.expect(len(users))
                async with conn.transaction():
                    await conn.execute(INSERT, users)
                committed = time.perf_counter()
                async with asyncio.timeout(60):
                    arrived = [await c.arrivals.get() for c in live]
                    await heard.done.wait()
                results.fanout.append([t - committed for t in arrived])
                results.fanout_notify.append(heard.last - committed)
            events = plan.fanout_runs * len(live)
            results.worker_cpu_per_event_us = (
                (cpu_seconds([worker.pid]) - cpu_before[0]) / events * 1e6
            )
            results.postgres_cpu_per_event_us = (cpu_seconds(pg) - cpu_before[1]) / events * 1e6
            results.clients_cpu_per_event_us = (
                (cpu_seconds([os.getpid()]) - cpu_before[2]) / events * 1e6
            )
            for client in clients[plan.streams :]:  # the extra streams got nothing: drain none
                assert client.arrivals.empty()
            for _ in range(plan.singles):
                client = random.choice(live)
                heard.expect(1)
                async with conn.transaction():
                    await conn.execute(INSERT, [client.user])
                committed = time.perf_counter()
                async with asyncio.timeout(30):
                    results.singles.append(await client.arrivals.get() - committed)
                    await heard.done.wait()
                results.singles_notify.append(heard.last - committed)
            await bare.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()
    finally:
        for task in tasks:
            task.cancel()
        if worker is not None:
            worker.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(30)
        cluster.stop()
    info = machine()
    info["postgres"] = str(version)
    return results, info


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(results: Results, info: dict[str, str], plan: Plan) -> str:
    lines = [
        "## bench.inbox — server-sent-event streams of the inbox feed",
        "",
        f"Machine: {info['cpu']}, {info['memory']}, {info['os']}, Python {info['python']}, "
        f"PostgreSQL {info['postgres']} (throwaway cluster, fsync on). Clients in the bench "
        "process, the worker in its own.",
        "",
        "| open streams | worker RSS (MB) | per 1,000 streams (MB) |",
        "|---:|---:|---:|",
        f"| 0 | {results.rss_idle_mb:.1f} | |",
    ]
    for count, mb in results.rss:
        per = (mb - results.rss_idle_mb) / count * 1000
        lines.append(f"| {count:,} | {mb:.1f} | {per:.1f} |")
    lines += [
        "",
        f"Opening {plan.steps[0]:,} streams (token check, replay query, counts) took "
        f"{results.open_seconds:.2f} s.",
        "",
        f"Delivery with {plan.streams:,} streams open (one user each), commit → event received:",
        "",
        "| run | messages | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, run in enumerate(results.fanout, 1):
        lines.append(
            f"| fan-out {n}: one message to each of {plan.streams:,} users in one commit | "
            f"{len(run):,} | {ms(statistics.median(run))} | {ms(pct(run, 0.99))} | "
            f"{ms(max(run))} |"
        )
    if results.fanout:
        medians = [statistics.median(r) for r in results.fanout]
        maxes = [max(r) for r in results.fanout]
        lines.append(
            f"| fan-out, median of runs | | {ms(statistics.median(medians))} | | "
            f"{ms(statistics.median(maxes))} |"
        )
        lines.append(
            f"| fan-out, the same commits: last NOTIFY heard by a bare LISTEN here "
            f"(median of runs) | | | | {ms(statistics.median(results.fanout_notify))} |"
        )
    s, b = results.singles, results.singles_notify
    lines.append(
        f"| single messages, one commit each | {len(s):,} | {ms(statistics.median(s))} | "
        f"{ms(pct(s, 0.99))} | {ms(max(s))} |"
    )
    lines.append(
        f"| single messages: the same commits heard by a bare LISTEN here | {len(b):,} | "
        f"{ms(statistics.median(b))} | {ms(pct(b, 0.99))} | {ms(max(b))} |"
    )
    lines += [
        "",
        f"CPU per delivered fan-out message (from /proc, clock ticks): worker "
        f"{results.worker_cpu_per_event_us:.0f} µs, PostgreSQL "
        f"{results.postgres_cpu_per_event_us:.0f} µs, the {plan.streams:,} clients (this process) "
        f"{results.clients_cpu_per_event_us:.0f} µs. The machine (2 cores) is shared: the wait "
        "beyond that CPU is other processes'.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers not meaningful")
    parser.add_argument("--save", help="also write the table to this file")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    results, info = asyncio.run(bench(plan))
    table = report(results, info, plan)
    print(table)
    if args.save:
        with open(args.save, "w") as out:
            out.write(table + "\n")


if __name__ == "__main__":
    main()
