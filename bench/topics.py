"""Topic fan-out (issue 15): pgnotify.notify_topic() to 100,000 subscribers, on a durable (fsync
on) throwaway cluster. Not a test: it never fails on a time.

    python -m bench.topics            # 3 rounds, 100,000 subscribers
    python -m bench.topics --smoke    # seconds; the numbers mean nothing

For each variant (in-app only without an idempotency key, in-app with one, email + in-app with
one) and round, on emptied tables: one transaction calls notify_topic() and commits, timed
(seconds, rows/s). Meanwhile a second producer INSERTs single rows in autocommit, as an
application would, and a third connection samples pg_locks: the commit latency of that producer
during the fan-out beside its latency just before it (same run), how many of its INSERTs
completed while the fan-out ran, which locks the fan-out's transaction held, and whether any
backend ever waited for a lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.run import DURABLE, machine, pct
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster

INSERT = (
    "INSERT INTO pgnotify.notifications (channel, recipient, category, body) "
    "VALUES ('inapp', 'someone-else', 'orders', 'your order shipped')"
)
VARIANTS = {
    "in-app, no idempotency key": ("{inapp}", None),
    "in-app, idempotency key": ("{inapp}", "launch"),
    "email + in-app, idempotency key": ("{email,inapp}", "launch"),
}


@dataclass
class Plan:
    subscribers: int = 100_000
    rounds: int = 3
    baseline_seconds: float = 2.0
    history: int = 50_000


SMOKE = Plan(2_000, 1, 0.3, 2_000)


@dataclass
class Run:
    seconds: float
    rows: int
    before_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)
    locks: set[str] = field(default_factory=set)
    waiting: int = 0  # samples in which some backend waited for a lock


async def prepare(conn: asyncpg.Connection, subscribers: int) -> None:
    await migrate.migrate(conn)
    # Setup data, loaded without triggers: contacts_validate looks each time zone up in
    # pg_timezone_names, tens of milliseconds a row (100,000 contacts would take an hour).
    await conn.execute(
        """
        SET session_replication_role = replica;
        SELECT pgnotify.create_topic('launch', 'everyone who follows the launch');
        INSERT INTO pgnotify.contacts (user_id, email)
        SELECT 'user-' || g, 'user-' || g || '@example.com' FROM generate_series(1, $1) g;
        INSERT INTO pgnotify.topic_subscriptions (topic, user_id)
        SELECT 'launch', 'user-' || g FROM generate_series(1, $1) g;
        SET session_replication_role = DEFAULT;
        """.replace("$1", str(int(subscribers)))
    )
    await conn.execute("VACUUM ANALYZE pgnotify.contacts")
    await conn.execute("VACUUM ANALYZE pgnotify.topic_subscriptions")


async def reset(conn: asyncpg.Connection, history: int) -> None:
    """Empty the queue but for `history` earlier keyed rows, analysed: a live queue's table is
    not empty, and on an empty one the idempotency trigger's lookup (0008) is planned as a
    sequential scan, which makes a keyed INSERT ... SELECT quadratic."""
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, body, idempotency_key) "
        "SELECT 'inapp', 'earlier-' || g, 'x', 'earlier-' || g FROM generate_series(1, $1) g",
        history,
    )
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    await conn.execute("CHECKPOINT")


async def producer(dsn: str, stop: asyncio.Event, into: list[float]) -> None:
    """Single-row INSERTs in autocommit until `stop`; milliseconds each, commit included."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            await conn.execute(INSERT)
            into.append((time.perf_counter() - started) * 1000)
    finally:
        await conn.close()


async def sampler(dsn: str, pid: int, stop: asyncio.Event, run: Run) -> None:
    """The fan-out backend's relation locks, and whether anyone waits, every 50 ms."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            rows = await conn.fetch(
                "SELECT l.pid, l.granted, l.mode, c.relname FROM pg_locks l "
                "LEFT JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.locktype IN ('relation', 'advisory', 'transactionid', 'tuple')"
            )
            for r in rows:
                if (
                    r["pid"] == pid
                    and r["relname"]
                    and not r["relname"].endswith(("_pkey", "_idx"))
                ):
                    run.locks.add(f"{r['relname']}: {r['mode']}")
            if any(not r["granted"] for r in rows):
                run.waiting += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        await conn.close()


async def fan_out(dsn: str, channels: str, key: str | None, plan: Plan) -> Run:
    conn = await asyncpg.connect(dsn)
    try:
        before: list[float] = []
        stop = asyncio.Event()
        side = asyncio.create_task(producer(dsn, stop, before))
        await asyncio.sleep(plan.baseline_seconds)
        stop.set()
        await side

        during: list[float] = []
        stop = asyncio.Event()
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        run = Run(0.0, 0)
        side = asyncio.create_task(producer(dsn, stop, during))
        watch = asyncio.create_task(sampler(dsn, pid, stop, run))
        started = time.perf_counter()
        async with conn.transaction():
            rows = await conn.fetchval(
                "SELECT pgnotify.notify_topic('launch', 'launch', subject => 'We launched', "
                "body => 'Hello {{ name }}', channels => $1::text::text[], idempotency_key => $2)",
                channels,
                key,
            )
        run.seconds = time.perf_counter() - started
        stop.set()
        await asyncio.gather(side, watch)
        run.rows = rows
        run.before_ms = before
        run.during_ms = during
        return run
    finally:
        await conn.close()


async def bench(plan: Plan) -> str:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE topics")
        version = await admin.fetchval("SHOW server_version")
        await admin.close()
        dsn = cluster.dsn("topics")
        conn = await asyncpg.connect(dsn)
        await prepare(conn, plan.subscribers)
        runs: dict[str, list[Run]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(plan.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                await reset(conn, plan.history)
                channels, key = VARIANTS[name]
                runs[name].append(await fan_out(dsn, channels, key, plan))
        await conn.close()
    finally:
        cluster.destroy()
    return report(plan, version, runs)


def report(plan: Plan, version: str, runs: dict[str, list[Run]]) -> str:
    lines = ["## Topic fan-out: notify_topic() to every subscriber", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {version} (throwaway cluster, fsync on, synchronous_commit on)",
        f"- {plan.subscribers:,} subscribers, each with an email address; {plan.rounds} rounds, "
        "variants rotated each round; no worker running",
        f"- before each fan-out the queue holds {plan.history:,} earlier keyed rows (analysed)",
        "",
        "### The fan-out: one transaction, notify_topic() then COMMIT",
        "",
        "| variant | rows | seconds (median) | rounds | rows/s (median) |",
        "|---|---:|---:|---|---:|",
    ]
    for name, rs in runs.items():
        secs = [r.seconds for r in rs]
        lines.append(
            f"| {name} | {rs[0].rows:,} | {statistics.median(secs):.2f} | "
            f"{', '.join(f'{s:.2f}' for s in secs)} | "
            f"{statistics.median(r.rows / r.seconds for r in rs):,.0f} |"
        )
    lines += [
        "",
        "### The other producers meanwhile: single-row INSERT + COMMIT on another connection",
        "",
        f"Just before (for {plan.baseline_seconds:g} s) and during the fan-out, same round; "
        "all rounds pooled.",
        "",
        "| variant | INSERTs during | p50 before ms | p50 during ms | p99 before ms "
        "| p99 during ms | max during ms | lock waits seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        before = [v for r in rs for v in r.before_ms]
        during = [v for r in rs for v in r.during_ms]
        lines.append(
            f"| {name} | {len(during):,} | {pct(before, 0.5):.2f} | {pct(during, 0.5):.2f} | "
            f"{pct(before, 0.99):.2f} | {pct(during, 0.99):.2f} | {max(during):.1f} | "
            f"{sum(r.waiting for r in rs)} |"
        )
    held = sorted({lock for rs in runs.values() for r in rs for lock in r.locks})
    lines += [
        "",
        "Relation locks the fan-out's transaction held (sampled every 50 ms): "
        + (", ".join(held) or "none seen"),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers mean nothing")
    parser.add_argument("--subscribers", type=int, help="instead of 100,000")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.subscribers:
        plan.subscribers = args.subscribers
    table = asyncio.run(bench(plan))
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
