"""Isolation per destination: a healthy webhook endpoint's commit-to-receive latency alone, then
beside a neighbour answering 503 and one taking 10 s per answer (same worker, same channel),
and the same again with the per-destination cap lifted (what a per-provider design does with the
slow neighbour). Not a test.

    python -m bench.isolation            # 20 s per phase
    python -m bench.isolation --smoke    # a few seconds; never fails on a time
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from bench.run import DURABLE, SECRET, machine, pct, sink_count, sink_stats, wait_http
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port


@dataclass
class Plan:
    seconds: float = 20.0
    healthy_rate: float = 100.0
    failing_rate: float = 50.0
    slow_rate: float = 20.0
    slow_seconds: float = 10.0
    concurrency: int = 50
    wait_limit: float = 120.0


SMOKE = Plan(2.0, 50.0, 20.0, 10.0, 1.0, 50, 20.0)


class Neighbours:
    """The failing (503) and slow endpoints, in this process: cheap (the slow one only sleeps)."""

    def __init__(self, slow_seconds: float) -> None:
        self.slow_seconds = slow_seconds
        self.failing = 0
        self.slow_now = 0
        self.slow_max = 0
        self.slow_done = 0

    async def fail(self, _request: web.Request) -> web.Response:
        self.failing += 1
        return web.Response(status=503)

    async def slow(self, _request: web.Request) -> web.Response:
        self.slow_now += 1
        self.slow_max = max(self.slow_max, self.slow_now)
        try:
            await asyncio.sleep(self.slow_seconds)
        finally:
            self.slow_now -= 1
        self.slow_done += 1
        return web.Response(status=200)

    def reset(self) -> None:
        self.failing = self.slow_max = self.slow_done = 0


async def serve(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def start_worker(env: dict[str, str], cap: int | None) -> subprocess.Popen[bytes]:
    extra = {"PGNOTIFY_DESTINATION_CONCURRENCY": str(cap)} if cap is not None else {}
    return subprocess.Popen(
        [sys.executable, "-m", "pgnotify_worker", "run"],
        env={**env, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def phase(
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    urls: dict[str, str],
    sink_port: int,
    plan: Plan,
    neighbours: Neighbours | None,
) -> dict[str, float]:
    """Insert a steady mix for plan.seconds; the healthy rows' commit-to-receive latency."""
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    insert = await conn.prepare(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload, max_attempts) "
        "VALUES ('webhook', $1, jsonb_build_object('seq', $2::int), 50)"
    )
    rates = {"healthy": plan.healthy_rate}
    if neighbours is not None:
        neighbours.reset()
        rates |= {"failing": plan.failing_rate, "slow": plan.slow_rate}
    tick = 1 / max(rates.values())
    owed = dict.fromkeys(rates, 0.0)
    committed: dict[int, float] = {}
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < plan.seconds:
        delay = start + step * tick - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        step += 1
        for kind, rate in rates.items():
            owed[kind] += rate * tick
            while owed[kind] >= 1:
                owed[kind] -= 1
                seq = len(committed) if kind == "healthy" else -1
                await insert.fetch(urls[kind], seq)
                if kind == "healthy":
                    committed[seq] = time.monotonic()
    deadline = time.monotonic() + plan.wait_limit
    while time.monotonic() < deadline and await sink_count(http, sink_port) < len(committed):
        await asyncio.sleep(0.1)
    arrivals = (await sink_stats(http, sink_port))["arrivals"]
    ms = [(arrivals[str(s)] - t) * 1000 for s, t in committed.items() if str(s) in arrivals]
    result = {
        "sent": len(committed),
        "received": len(ms),
        "p50": pct(ms, 0.50) if ms else float("nan"),
        "p95": pct(ms, 0.95) if ms else float("nan"),
        "p99": pct(ms, 0.99) if ms else float("nan"),
        "max": max(ms) if ms else float("nan"),
        "failing_requests": neighbours.failing if neighbours else 0,
        "slow_max_in_flight": neighbours.slow_max if neighbours else 0,
        "slow_answered": neighbours.slow_done if neighbours else 0,
    }
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events, pgnotify.destinations")
    return result


async def bench(plan: Plan) -> tuple[list[tuple[str, dict[str, float]]], dict[str, str]]:
    cluster = TempCluster(settings=DURABLE).start()
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    neighbours = Neighbours(plan.slow_seconds)
    fail_runner, fail_port = await serve(neighbours.fail)
    slow_runner, slow_port = await serve(neighbours.slow)
    urls = {
        "healthy": f"http://127.0.0.1:{sink_port}/hook",
        "failing": f"http://127.0.0.1:{fail_port}/hook",
        "slow": f"http://127.0.0.1:{slow_port}/hook",
    }
    env = {
        **os.environ,
        "PGNOTIFY_DATABASE_URL": cluster.dsn(),
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={plan.concurrency}",
        "PGNOTIFY_WEBHOOK_SECRET": SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_WEBHOOK_TIMEOUT": str(plan.slow_seconds + 5),  # slow answers, not timeouts
        "PGNOTIFY_RETRY_BASE_SECONDS": "1",
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": str(http_port),
        "PGNOTIFY_LOG_LEVEL": "ERROR",
    }
    results: list[tuple[str, dict[str, float]]] = []
    worker = None
    try:
        conn = await asyncpg.connect(cluster.dsn())
        # the INSERT check refuses loopback webhook URLs unless allowed: the receivers are local
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f"ALTER DATABASE \"{database}\" SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        await conn.execute("SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'")
        await migrate.migrate(conn)
        version = await conn.fetchval("SHOW server_version")
        await wait_http(f"http://127.0.0.1:{sink_port}/count")
        async with aiohttp.ClientSession() as http:
            for name, cap, with_neighbours in (
                ("healthy alone", None, False),
                ("beside a 503 and a slow endpoint", None, True),
                ("same, per-destination cap lifted", 10_000, True),
            ):
                worker = start_worker(env, cap)
                await wait_http(f"http://127.0.0.1:{http_port}/readyz")
                await asyncio.sleep(0.5)
                results.append(
                    (
                        name,
                        await phase(
                            conn,
                            http,
                            urls,
                            sink_port,
                            plan,
                            neighbours if with_neighbours else None,
                        ),
                    )
                )
                worker.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(plan.slow_seconds + 30)
                worker = None
        await conn.close()
    finally:
        for proc in (worker, sink):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        await fail_runner.cleanup()
        await slow_runner.cleanup()
        cluster.destroy()
    info = machine()
    info["postgresql"] = f"{version} (own throwaway cluster, fsync on)"
    return results, info


def report(results: list[tuple[str, dict[str, float]]], info: dict[str, str], plan: Plan) -> str:
    lines = ["## Isolation per destination: a healthy webhook endpoint beside bad neighbours", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        f"- one worker, webhook concurrency {plan.concurrency} (per-destination cap: default, "
        f"{max(1, plan.concurrency // 4)}); {plan.seconds:.0f} s per phase; healthy "
        f"{plan.healthy_rate:.0f}/s, failing (503) {plan.failing_rate:.0f}/s, slow "
        f"({plan.slow_seconds:.0f} s per answer) {plan.slow_rate:.0f}/s",
        "",
        "| phase | healthy p50 ms | p95 ms | p99 ms | max ms | received / sent | 503 requests | "
        "slow: most in flight / answered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results:
        lines.append(
            f"| {name} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | "
            f"{r['received']:.0f} / {r['sent']:.0f} | {r['failing_requests']:.0f} | "
            f"{r['slow_max_in_flight']:.0f} / {r['slow_answered']:.0f} |"
        )
    base = results[0][1]["p99"]
    lines += ["", f"healthy p99 beside the neighbours: {results[1][1]['p99'] - base:+.2f} ms"]
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
