"""The producer's side (issue 12): what an INSERT into pgnotify.notifications costs the
application's transaction, side by side in one run on a durable (fsync on) throwaway cluster.
Not a test: it never fails on a time.

    python -m bench.producers            # 3 rounds of 10 s per variant, then the rest
    python -m bench.producers --smoke    # seconds; the numbers mean nothing

1. pgbench, 32 clients, one single-row INSERT per transaction, four tables in turn each round:
   the shipped table with a worker awake on the channel (it holds the wake token, so the INSERT
   sends no NOTIFY), the shipped table with nobody awake (every commit notifies), the same table,
   indexes and constraints without triggers, and a bare table of the same columns (primary key
   only). Medians of the rounds and the ratios.
2. One producer, one INSERT per transaction: commit latency p50/p99 of the same variants.
3. 1,000 notifications at once: single-row INSERTs in one transaction, enqueue() calls,
   enqueue_many(jsonb), one INSERT ... SELECT, COPY.
4. Chat fan-out: one message into a room of 50 and of 500 members.
5. Pick-up, a worker running (PGNOTIFY_WAKE_TOKENS on and off): commit to receiver at 10/s (the
   worker asleep between rows) and 200/s (awake), and a burst from 32 producers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import DURABLE, SECRET, machine, pct, sink_count, sink_stats, wait_http
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, find_bindir, free_port

URL = "https://hooks.example.com/in/"
PAYLOAD = '{"order": 42, "state": "shipped"}'
VARIANTS = {
    "shipped, a worker awake (no NOTIFY)": "pgnotify.notifications",
    "shipped, nobody awake (NOTIFY)": "pgnotify.notifications",
    "same table, indexes, constraints; no triggers": "bench_plain",
    "bare: same columns, primary key only": "bench_bare",
}
AWAKE, NOTIFYING, PLAIN, BARE = VARIANTS


@dataclass
class Plan:
    rounds: int = 3
    seconds: int = 10
    clients: int = 32
    commits: int = 2000
    batch: int = 1000
    batch_runs: int = 5
    chat_messages: int = 100
    pickup_seconds: float = 10.0
    burst_rows: int = 50


SMOKE = Plan(1, 2, 8, 100, 200, 1, 5, 2.0, 5)


async def prepare(conn: asyncpg.Connection) -> None:
    await migrate.migrate(conn)
    await conn.execute(
        "CREATE TABLE bench_plain (LIKE pgnotify.notifications INCLUDING ALL);"
        "CREATE TABLE bench_bare "
        "(LIKE pgnotify.notifications INCLUDING DEFAULTS INCLUDING IDENTITY);"
        "ALTER TABLE bench_bare ADD PRIMARY KEY (id);"
    )


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events, bench_plain, bench_bare")
    for statement in (
        "VACUUM ANALYZE pgnotify.notifications",
        "VACUUM ANALYZE bench_plain",
        "VACUUM ANALYZE bench_bare",
        "CHECKPOINT",
    ):
        await conn.execute(statement)


@contextlib.asynccontextmanager
async def awake(dsn: str, channel: str = "webhook") -> AsyncIterator[None]:
    """Hold the channel's wake token, as a worker busy on it does."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(
            "SELECT pg_try_advisory_lock(72453901, pgnotify.wake_lock_key($1))", channel
        )
        yield
    finally:
        await conn.close()


def pgbench(dsn: str, table: str, seconds: int, clients: int, workdir: Path) -> float:
    binary = shutil.which("pgbench") or str(find_bindir() / "pgbench")
    script = workdir / f"{table}.sql"
    script.write_text(
        f"INSERT INTO {table} (channel, recipient, payload) "
        f"VALUES ('webhook', '{URL}' || :client_id, '{PAYLOAD}');\n"
    )
    out = subprocess.run(
        [binary, "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-f", str(script), dsn],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    match = re.search(r"tps = ([\d.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"pgbench said: {out.stdout}\n{out.stderr}")
    return float(match.group(1))


async def throughput(dsn: str, conn: asyncpg.Connection, plan: Plan) -> dict[str, list[float]]:
    """Each round runs every variant once, in a rotated order, on emptied tables."""
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    workdir = Path(tempfile.mkdtemp(prefix="pgnotify-producers-"))
    try:
        for r in range(plan.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                await reset(conn)
                async with contextlib.AsyncExitStack() as stack:
                    if name == AWAKE:
                        await stack.enter_async_context(awake(dsn))
                    runs[name].append(
                        await asyncio.to_thread(
                            pgbench, dsn, VARIANTS[name], plan.seconds, plan.clients, workdir
                        )
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


async def commit_latency(dsn: str, conn: asyncpg.Connection, plan: Plan) -> dict[str, list[float]]:
    """One producer, autocommit: milliseconds per INSERT (commit included)."""
    result: dict[str, list[float]] = {}
    for name, table in VARIANTS.items():
        await reset(conn)
        insert = await conn.prepare(
            f"INSERT INTO {table} (channel, recipient, payload) VALUES ('webhook', $1, $2::jsonb)"
        )
        async with contextlib.AsyncExitStack() as stack:
            if name == AWAKE:
                await stack.enter_async_context(awake(dsn))
            for i in range(50):  # warm the plans and caches
                await insert.fetch(f"{URL}{i}", PAYLOAD)
            times = []
            for i in range(plan.commits):
                started = time.perf_counter()
                await insert.fetch(f"{URL}{i}", PAYLOAD)
                times.append((time.perf_counter() - started) * 1000)
        result[name] = times
    return result


async def batches(dsn: str, conn: asyncpg.Connection, plan: Plan) -> dict[str, float]:
    """Milliseconds to enqueue `plan.batch` notifications at once (median of runs), no worker
    awake (one NOTIFY per transaction at most)."""
    n = plan.batch
    urls = [f"{URL}{i}" for i in range(n)]
    items = [
        {"channel": "webhook", "recipient": u, "payload": {"order": i}} for i, u in enumerate(urls)
    ]
    items_json = json.dumps(items)

    async def singles() -> None:
        async with conn.transaction():
            stmt = await conn.prepare(
                "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
                "VALUES ('webhook', $1, $2::jsonb)"
            )
            await stmt.executemany([(u, PAYLOAD) for u in urls])

    async def enqueues() -> None:
        async with conn.transaction():
            stmt = await conn.prepare(
                "SELECT pgnotify.enqueue('webhook', $1, payload => $2::jsonb)"
            )
            await stmt.executemany([(u, PAYLOAD) for u in urls])

    async def many() -> None:
        await conn.fetchval("SELECT pgnotify.enqueue_many($1::jsonb)", items_json)

    async def insert_select() -> None:
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', u, $2::jsonb FROM unnest($1::text[]) u",
            urls,
            PAYLOAD,
        )

    async def copy() -> None:
        await conn.copy_records_to_table(
            "notifications",
            schema_name="pgnotify",
            columns=["channel", "recipient"],
            records=[("webhook", u) for u in urls],
        )

    ways = {
        f"{n:,} single-row INSERTs, one transaction": singles,
        f"{n:,} enqueue() calls, one transaction": enqueues,
        "enqueue_many(jsonb array), one statement": many,
        "INSERT ... SELECT FROM unnest(arrays), one statement": insert_select,
        "COPY": copy,
    }
    result = {}
    for name, way in ways.items():
        times = []
        for _ in range(plan.batch_runs + 1):
            await reset(conn)
            started = time.perf_counter()
            await way()
            times.append((time.perf_counter() - started) * 1000)
        result[name] = statistics.median(times[1:] or times)  # the first run warms up
    return result


async def chat(conn: asyncpg.Connection, plan: Plan) -> dict[int, dict[str, float]]:
    """One chat message per transaction into a room of N members (as bench/chat.py: a tenth
    muted, half with a push device, a third with email on a daily digest)."""
    result = {}
    for members in (50, 500):
        room = f"room-{members}"
        await conn.execute(
            f"""
            INSERT INTO pgnotify.chat_rooms (id, organization_id, name) VALUES ('{room}', 'org', 'R');
            INSERT INTO pgnotify.chat_room_members (room_id, user_id, muted)
                SELECT '{room}', 'm{members}-' || g, g % 10 = 0 FROM generate_series(1, {members}) g;
            INSERT INTO pgnotify.contacts (user_id, email, timezone)
                SELECT 'm{members}-' || g, 'm{members}-' || g || '@example.com', 'Europe/Paris'
                FROM generate_series(1, {members}) g;
            INSERT INTO pgnotify.devices (user_id, platform, token)
                SELECT 'm{members}-' || g, 'android', 'tok-{members}-' || g
                FROM generate_series(1, {members}, 2) g;
            SELECT pgnotify.set_preference('m{members}-' || g, 'daily', 'email', 'chat')
                FROM generate_series(1, {members}, 3) g;
            """
        )
        insert = await conn.prepare(
            f"INSERT INTO pgnotify.chat_messages (room_id, author_id, body) "
            f"VALUES ('{room}', 'm{members}-1', $1)"
        )
        await reset(conn)
        for i in range(5):
            await insert.fetch(f"warm-up {i}")
        before = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications")
        times = []
        for i in range(plan.chat_messages):
            started = time.perf_counter()
            await insert.fetch(f"message {i}")
            times.append((time.perf_counter() - started) * 1000)
        made = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") - before
        per = made / plan.chat_messages
        result[members] = {
            "per_message": per,
            "p50": statistics.median(times),
            "p99": pct(times, 0.99),
            "us_per_notification": 1000 * statistics.median(times) / per,
        }
    return result


async def pickup(
    dsn: str, conn: asyncpg.Connection, plan: Plan, wake_tokens: bool
) -> dict[str, dict[str, float]]:
    """Commit to receiver with a worker running (concurrency 50): a steady 10/s and 200/s, and
    a burst of single-row transactions from 32 producers."""
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    env = {
        **os.environ,
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_WEBHOOK_SECRET": SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": str(http_port),
        "PGNOTIFY_LOG_LEVEL": "WARNING",
        "PGNOTIFY_WAKE_TOKENS": "true" if wake_tokens else "false",
        "PGNOTIFY_JOBS": "false",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "pgnotify_worker", "run"], env=env, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{sink_port}/hook"
    result: dict[str, dict[str, float]] = {}
    try:
        await wait_http(f"http://127.0.0.1:{sink_port}/stats")
        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
        async with aiohttp.ClientSession() as http:
            insert = await conn.prepare(
                "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
                "VALUES ('webhook', $1, jsonb_build_object('seq', $2::int))"
            )
            for rate in (10.0, 200.0):
                await reset(conn)
                await http.post(f"http://127.0.0.1:{sink_port}/reset")
                committed: dict[int, float] = {}
                count = max(10, int(rate * plan.pickup_seconds))
                start = time.monotonic()
                for seq in range(count):
                    delay = start + seq / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await insert.fetch(url, seq)
                    committed[seq] = time.monotonic()
                async with asyncio.timeout(60):
                    while await sink_count(http, sink_port) < count:
                        await asyncio.sleep(0.05)
                arrivals = (await sink_stats(http, sink_port))["arrivals"]
                ms = [(arrivals[str(s)] - t) * 1000 for s, t in committed.items()]
                result[f"{rate:.0f}/s"] = {
                    "p50": pct(ms, 0.5),
                    "p99": pct(ms, 0.99),
                    "max": max(ms),
                    "rows": len(ms),
                }
            await reset(conn)
            await http.post(f"http://127.0.0.1:{sink_port}/reset")
            producers = [await asyncpg.connect(dsn) for _ in range(32)]
            committed = {}

            async def produce(p: asyncpg.Connection, k: int) -> None:
                stmt = await p.prepare(
                    "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
                    "VALUES ('webhook', $1, jsonb_build_object('seq', $2::int))"
                )
                for i in range(plan.burst_rows):
                    seq = k * plan.burst_rows + i
                    await stmt.fetch(url, seq)
                    committed[seq] = time.monotonic()

            started = time.monotonic()
            try:
                await asyncio.gather(*(produce(p, k) for k, p in enumerate(producers)))
            finally:
                for p in producers:
                    await p.close()
            inserted = time.monotonic()
            total = 32 * plan.burst_rows
            async with asyncio.timeout(120):
                while await sink_count(http, sink_port) < total:
                    await asyncio.sleep(0.01)
            delivered = time.monotonic()
            arrivals = (await sink_stats(http, sink_port))["arrivals"]
            ms = [(arrivals[str(s)] - t) * 1000 for s, t in committed.items()]
            result["burst"] = {
                "p50": pct(ms, 0.5),
                "p99": pct(ms, 0.99),
                "max": max(ms),
                "rows": len(arrivals),
                "inserted_per_s": total / (inserted - started),
                "delivered_s": delivered - started,
            }
    finally:
        for proc in (worker, sink):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    return result


async def bench(plan: Plan) -> str:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE producers")
        await admin.execute(
            "ALTER DATABASE producers SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        version = await admin.fetchval("SHOW server_version")
        await admin.close()
        dsn = cluster.dsn("producers")
        conn = await asyncpg.connect(dsn)
        await prepare(conn)
        runs = await throughput(dsn, conn, plan)
        latency = await commit_latency(dsn, conn, plan)
        sets = await batches(dsn, conn, plan)
        rooms = await chat(conn, plan)
        picked = {tokens: await pickup(dsn, conn, plan, tokens) for tokens in (True, False)}
        await conn.close()
    finally:
        cluster.destroy()
    return report(plan, version, runs, latency, sets, rooms, picked)


def report(
    plan: Plan,
    version: str,
    runs: dict[str, list[float]],
    latency: dict[str, list[float]],
    sets: dict[str, float],
    rooms: dict[int, dict[str, float]],
    picked: dict[bool, dict[str, dict[str, float]]],
) -> str:
    med = {name: statistics.median(values) for name, values in runs.items()}
    lines = ["## Producer path: what an INSERT costs the application", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {version} (throwaway cluster, fsync on, synchronous_commit on)",
        "",
        f"### {plan.clients} concurrent producers, one single-row INSERT per transaction "
        f"(pgbench, {plan.rounds} rounds x {plan.seconds} s, variants rotated each round)",
        "",
        "`INSERT INTO <table> (channel, recipient, payload) VALUES ('webhook', "
        "'https://hooks.example.com/in/' || :client_id, '{...}')`",
        "",
        "| variant | INSERTs/s (median) | rounds | / no triggers | / bare |",
        "|---|---:|---|---:|---:|",
    ]
    for name in VARIANTS:
        lines.append(
            f"| {name} | {med[name]:,.0f} | {', '.join(f'{v:,.0f}' for v in runs[name])} | "
            f"{med[name] / med[PLAIN]:.2f} | {med[name] / med[BARE]:.2f} |"
        )
    lines += [
        "",
        "### One producer: commit latency of a single-row INSERT (autocommit, "
        f"{plan.commits:,} each)",
        "",
        "| variant | p50 ms | p99 ms |",
        "|---|---:|---:|",
    ]
    for name, times in latency.items():
        lines.append(f"| {name} | {pct(times, 0.5):.2f} | {pct(times, 0.99):.2f} |")
    lines += [
        "",
        f"### {plan.batch:,} notifications at once (one producer, nobody awake; median of "
        f"{plan.batch_runs})",
        "",
        "| how | ms | µs per notification |",
        "|---|---:|---:|",
    ]
    for name, ms in sets.items():
        lines.append(f"| {name} | {ms:.1f} | {1000 * ms / plan.batch:.0f} |")
    lines += [
        "",
        f"### Chat fan-out: one message per transaction ({plan.chat_messages} messages)",
        "",
        "| room members | notifications per message | p50 ms | p99 ms | µs per notification |",
        "|---:|---:|---:|---:|---:|",
    ]
    for members, r in rooms.items():
        lines.append(
            f"| {members} | {r['per_message']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['us_per_notification']:.0f} |"
        )
    lines += [
        "",
        "### Pick-up with a worker running: commit to receiver (one worker, webhook "
        "concurrency 50)",
        "",
        "| load | wake tokens | rows | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    bursts = []
    for tokens, result in picked.items():
        for load, r in result.items():
            what = (
                f"burst: 32 producers x {plan.burst_rows} single-row transactions"
                if load == "burst"
                else f"steady {load}"
            )
            lines.append(
                f"| {what} | {'on' if tokens else 'off'} | {r['rows']:.0f} | {r['p50']:.2f} | "
                f"{r['p99']:.2f} | {r['max']:.2f} |"
            )
            if load == "burst":
                bursts.append(
                    f"wake tokens {'on' if tokens else 'off'}: the producers inserted "
                    f"{r['inserted_per_s']:,.0f} rows/s, all {r['rows']:.0f} delivered "
                    f"{r['delivered_s']:.2f} s after the first"
                )
    lines += ["", "Burst: " + "; ".join(bursts) + " (a faster burst queues longer)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers mean nothing")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    table = asyncio.run(bench(SMOKE if args.smoke else Plan()))
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
