"""A/B of worker variants on one drain, side by side in one run: each variant is a worker started
afresh with its own environment (a PYTHONPATH to another checkout's src/, settings) and, before
it starts, SQL run on the benchmark database (e.g. a function's plan_cache_mode). Variants
alternate round by round, so drift on a shared machine hits all of them; medians are printed.

    python -m bench.worker_ab                         # the claim A/B below, 5 rounds
    python -m bench.worker_ab --variants file.json    # {"name": {"env": {...}, "sql": "..."}}
    python -m bench.worker_ab --smoke                 # seconds; numbers are not meaningful

The default variants price what schema 0028 and claiming ahead changed: the claim's plan kept per
session (0023-0027) against planned per call, with claiming ahead on (this checkout) and, with
--base DIR (a checkout of the code before claiming ahead), off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.run import (
    DURABLE,
    cpu_seconds,
    machine,
    postgres_pids,
    sink_count,
    wait_http,
    webhook_worker_env,
)
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port

CLAIM = "pgnotify.claim(text, integer, text, double precision, timestamptz)"


def default_variants(base: str | None) -> dict[str, dict[str, Any]]:
    kept = f"ALTER FUNCTION {CLAIM} SET plan_cache_mode = force_generic_plan"
    per_call = f"ALTER FUNCTION {CLAIM} SET plan_cache_mode = force_custom_plan"
    variants: dict[str, dict[str, Any]] = {
        "claim plan kept per session (0023-0027), claim ahead": {"sql": kept},
        "claim planned per call (0028), claim ahead": {"sql": per_call},
    }
    if base:
        variants["claim planned per call (0028), code of --base"] = {
            "sql": per_call,
            "env": {"PYTHONPATH": str(Path(base) / "src")},
        }
    return variants


async def drain(
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    sink_port: int,
    worker: subprocess.Popen[bytes],
    pg: list[int],
    rows: int,
) -> tuple[float, float, float]:
    """Rows per second, worker and PostgreSQL CPU µs per row (the backlog's INSERT included)."""
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    url = f"http://127.0.0.1:{sink_port}/hook"
    cpu_worker, cpu_pg = cpu_seconds([worker.pid]), cpu_seconds(pg)
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
        url,
        rows,
    )
    started = time.monotonic()
    async with asyncio.timeout(600):
        while await sink_count(http, sink_port) < rows:
            await asyncio.sleep(0.05)
        while await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status <> 'sent'"
        ):
            await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    return (
        rows / elapsed,
        1e6 * (cpu_seconds([worker.pid]) - cpu_worker) / rows,
        1e6 * (cpu_seconds(pg) - cpu_pg) / rows,
    )


async def run(
    variants: dict[str, dict[str, Any]], rounds: int, rows: int, concurrency: int
) -> tuple[dict[str, list[tuple[float, float, float]]], str]:
    cluster = TempCluster(settings=DURABLE).start()
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    try:
        admin = await asyncpg.connect(cluster.dsn())
        version = await admin.fetchval("SHOW server_version")
        await admin.execute("CREATE DATABASE bench_ab")
        await admin.execute(
            "ALTER DATABASE bench_ab SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        await admin.close()
        dsn = cluster.dsn("bench_ab")
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        await wait_http(f"http://127.0.0.1:{sink_port}/count")
        async with aiohttp.ClientSession() as http:
            for round_ in range(rounds + 1):  # round 0 warms up and is not counted
                for name, variant in variants.items():
                    if variant.get("sql"):
                        await conn.execute(variant["sql"])
                    http_port = free_port()
                    env = webhook_worker_env(dsn, http_port, concurrency, **variant.get("env", {}))
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "pgnotify_worker", "run"],
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                    try:
                        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
                        figures = await drain(
                            conn,
                            http,
                            sink_port,
                            worker,
                            postgres_pids(cluster),
                            rows if round_ else min(rows, 2_000),
                        )
                    finally:
                        worker.terminate()
                        worker.wait(30)
                    if round_:
                        results[name].append(figures)
                    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
                    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
        await conn.close()
    finally:
        sink.terminate()
        sink.wait(10)
        cluster.destroy()
    return results, f"{version} (own throwaway cluster, fsync on)"


def report(
    results: dict[str, list[tuple[float, float, float]]],
    postgresql: str,
    rounds: int,
    rows: int,
    concurrency: int,
) -> str:
    lines = ["## Worker variants, A/B on one drain (`python -m bench.worker_ab`)", ""]
    lines += [f"- {key}: {value}" for key, value in machine().items()]
    lines += [
        f"- postgresql: {postgresql}",
        f"- {rows:,} webhook rows per drain, concurrency {concurrency}, a worker started afresh "
        f"per drain, {rounds} rounds alternating the variants (a warm-up round not counted)",
        "",
        "| variant | drain /s per round | median /s | worker CPU µs/notification | "
        "PostgreSQL CPU µs/notification (with the backlog's INSERT) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        rates = ", ".join(f"{r[0]:,.0f}" for r in runs)
        lines.append(
            f"| {name} | {rates} | {statistics.median(r[0] for r in runs):,.0f} | "
            f"{statistics.median(r[1] for r in runs):.0f} | "
            f"{statistics.median(r[2] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers not meaningful")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--base", help="a checkout of the code before claiming ahead")
    parser.add_argument("--variants", type=Path, help="JSON: {name: {env: {...}, sql: ...}}")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    variants = (
        json.loads(args.variants.read_text()) if args.variants else default_variants(args.base)
    )
    rounds, rows = (1, 1_000) if args.smoke else (args.rounds, args.rows)
    results, postgresql = asyncio.run(run(variants, rounds, rows, args.concurrency))
    table = report(results, postgresql, rounds, rows, args.concurrency)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
