"""Chat fan-out cost: milliseconds to insert one chat message (and create its notifications) in a
room of 50 members, committed, on a durable (fsync on) throwaway cluster. Not a test.

    python -m bench.chat            # 300 single-message transactions, then a 100-message insert
    python -m bench.chat --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from bench.run import DURABLE, machine, pct
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster

MEMBERS = 50


async def setup(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        INSERT INTO pgnotify.chat_rooms (id, organization_id, name) VALUES ('room', 'org', 'Room');
        INSERT INTO pgnotify.chat_room_members (room_id, user_id, muted)
            SELECT 'room', 'user-' || g, g % 10 = 0 FROM generate_series(1, $1) g;
        INSERT INTO pgnotify.contacts (user_id, email, timezone)
            SELECT 'user-' || g, 'user' || g || '@example.com', 'Europe/Paris'
            FROM generate_series(1, $1) g;
        INSERT INTO pgnotify.devices (user_id, platform, token)
            SELECT 'user-' || g, 'android', 'token-' || g FROM generate_series(1, $1, 2) g;
        SELECT pgnotify.set_preference('user-' || g, 'daily', 'email', 'chat')
            FROM generate_series(1, $1, 3) g;
        """.replace("$1", str(MEMBERS))
    )


async def run(count: int, bulk: int) -> dict[str, float]:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE chat")
        await admin.close()
        conn = await asyncpg.connect(cluster.dsn("chat"))
        await migrate.migrate(conn)
        await setup(conn)
        insert = await conn.prepare(
            "INSERT INTO pgnotify.chat_messages (room_id, author_id, body) VALUES ('room', 'user-1', $1)"
        )
        for i in range(20):  # warm the caches and plans
            await insert.fetch(f"warm-up {i}")
        before = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications")
        times = []
        for i in range(count):
            started = time.perf_counter()
            await insert.fetch(f"message {i}")  # autocommit: each is its own transaction
            times.append((time.perf_counter() - started) * 1000)
        created = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") - before
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO pgnotify.chat_messages (room_id, author_id, body) "
            "SELECT 'room', 'user-2', 'bulk ' || g FROM generate_series(1, $1) g",
            bulk,
        )
        bulk_ms = (time.perf_counter() - started) * 1000
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
    finally:
        cluster.destroy()
    return {
        "p50": statistics.median(times),
        "p95": pct(times, 0.95),
        "p99": pct(times, 0.99),
        "mean": statistics.mean(times),
        "per_message": created / count,
        "bulk_ms": bulk_ms,
        "bulk": bulk,
        "count": count,
        "version": version,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(run(30 if args.smoke else 300, 20 if args.smoke else 100))
    lines = ["## Chat fan-out: one message into a room of 50 members", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {r['version']} (throwaway cluster, fsync on); 50 members, 5 muted, "
        "half with a push device, a third with email on a daily digest",
        "",
        "| messages | notifications per message | p50 ms | p95 ms | p99 ms | mean ms | "
        f"{r['bulk']} messages in one INSERT, ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['count']} | {r['per_message']:.0f} | {r['p50']:.2f} | {r['p95']:.2f} | "
        f"{r['p99']:.2f} | {r['mean']:.2f} | {r['bulk_ms']:.0f} |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
