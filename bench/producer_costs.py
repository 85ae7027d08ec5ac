"""What each trigger and index on pgnotify.notifications costs a producer's INSERT: copies of one
migrated database, each with one thing removed or changed, measured in turn (rotated each round)
in one run on a durable throwaway cluster. Not a test: it never fails on a time.

    python -m bench.producer_costs            # 9 rounds
    python -m bench.producer_costs --smoke    # seconds; the numbers mean nothing

Two measures, both inside the server (no network round trip): single-row INSERT statements run
by a server-side loop (each statement opens the table's indexes and prepares its triggers), and
one INSERT ... SELECT of many rows (the cost a row). A worker is awake on the channel (its wake
token held), so no INSERT sends a NOTIFY.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import asyncpg

from bench.run import DURABLE, machine
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster

CONSOLE = [
    "notifications_status_id_idx",
    "notifications_channel_id_idx",
    "notifications_category_id_idx",
    "notifications_recipient_idx",
]
NO_WINDOW = "DROP TRIGGER notifications_window ON pgnotify.notifications"
VARIANTS = {
    "shipped": [],
    "notifications_window WHEN (NEW.batch_key IS NOT NULL)": [
        NO_WINDOW,
        "CREATE TRIGGER notifications_window BEFORE INSERT ON pgnotify.notifications "
        "FOR EACH ROW WHEN (NEW.batch_key IS NOT NULL) EXECUTE FUNCTION pgnotify.batch_item()",
    ],
    "no notifications_window trigger (0019)": [NO_WINDOW],
    "no console list indexes (0020)": [f"DROP INDEX pgnotify.{i}" for i in CONSOLE],
    "as before 0016-0020 (neither, nor notifications_batch_idx)": [
        NO_WINDOW,
        "DROP INDEX pgnotify.notifications_batch_idx",
        *[f"DROP INDEX pgnotify.{i}" for i in CONSOLE],
    ],
    "no triggers": ["ALTER TABLE pgnotify.notifications DISABLE TRIGGER USER"],
}
LOOP = (
    "DO $$ BEGIN FOR i IN 1..{n} LOOP INSERT INTO pgnotify.notifications (channel, recipient, "
    "payload) VALUES ('webhook', 'https://hooks.example.com/in/' || i, '{{\"order\": 42}}'); "
    "END LOOP; END $$"
)
BULK = (
    "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
    "SELECT 'webhook', 'https://hooks.example.com/in/' || i, '{\"order\": 42}' "
    "FROM generate_series(1, $1::int) AS i"
)


async def measure(dsn: str, single: int, bulk: int) -> tuple[float, float]:
    """µs per single-row INSERT statement, µs a row of one INSERT ... SELECT."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE pgnotify.notifications CASCADE")
        await conn.execute("VACUUM ANALYZE pgnotify.notifications")
        await conn.execute("SELECT pg_advisory_lock(72453901, pgnotify.wake_lock_key('webhook'))")
        await conn.execute(LOOP.format(n=50))  # warm the plans and caches
        started = time.perf_counter()
        await conn.execute(LOOP.format(n=single))
        one = (time.perf_counter() - started) / single * 1e6
        started = time.perf_counter()
        await conn.execute(BULK, bulk)
        many = (time.perf_counter() - started) / bulk * 1e6
        return one, many
    finally:
        await conn.close()


async def bench(rounds: int, single: int, bulk: int) -> str:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        version = await admin.fetchval("SHOW server_version")
        await admin.execute("CREATE DATABASE costs")
        conn = await asyncpg.connect(cluster.dsn("costs"))
        await migrate.migrate(conn)
        await conn.close()
        names = list(VARIANTS)
        for k, name in enumerate(names):
            await admin.execute(f"CREATE DATABASE v{k} TEMPLATE costs")
            variant = await asyncpg.connect(cluster.dsn(f"v{k}"))
            for statement in VARIANTS[name]:
                await variant.execute(statement)
            await variant.close()
        await admin.close()
        ones: dict[str, list[float]] = {n: [] for n in names}
        manys: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                one, many = await measure(cluster.dsn(f"v{names.index(name)}"), single, bulk)
                ones[name].append(one)
                manys[name].append(many)
    finally:
        cluster.destroy()
    base1 = statistics.median(ones["no triggers"])
    base2 = statistics.median(manys["no triggers"])
    lines = [
        "## What each trigger and index costs an INSERT (`python -m bench.producer_costs`)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {version} (throwaway cluster, fsync on); a worker awake (no NOTIFY)",
        f"- {rounds} rounds, variants rotated each round; {single:,} single-row INSERT statements "
        f"in a server-side loop, one INSERT ... SELECT of {bulk:,} rows; medians",
        "",
        "| variant | µs per single-row INSERT | / no triggers | µs a row, INSERT ... SELECT "
        "| / no triggers |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        one, many = statistics.median(ones[name]), statistics.median(manys[name])
        lines.append(
            f"| {name} | {one:.1f} | {one / base1:.2f} | {many:.1f} | {many / base2:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers mean nothing")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rounds, single, bulk = (1, 200, 500) if args.smoke else (args.rounds, 10_000, 30_000)
    table = asyncio.run(bench(rounds, single, bulk))
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
