"""What each piece of the worker's database path costs PostgreSQL, side by side in one run.

The worker's own claim and complete statements (pgnotify_worker.adapters.queries), run directly
from one connection against a backlog of webhook rows, with one piece changed per variant:
the status NOTIFY as shipped (a statement trigger, schema 0023) or as 0018's row trigger or off,
the claim as the function pgnotify.claim() (0023) or as the prepared statement before it, the
audit event left out of the complete, the console's list indexes (0020) dropped, and claim
batches of other sizes. Measured: the backend's CPU time per notification (from /proc) and the
wall time per notification. Variants alternate within each round, so drift on a shared host hits
them all; medians of the rounds are printed.

    python -m bench.pg_path                 # 5 rounds x 20,000 rows per variant
    python -m bench.pg_path --smoke         # seconds; numbers are not meaningful
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.run import DURABLE, machine
from pgnotify_worker.adapters import migrate, queries
from tests.support.pgcluster import TempCluster

ROW_TRIGGER_0018 = """
CREATE FUNCTION pgnotify.bench_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_status', json_build_object(
        'id', NEW.id, 'event', NEW.status, 'status', NEW.status, 'channel', NEW.channel,
        'category', left(NEW.category, 100), 'user_id', left(NEW.user_id, 256))::text);
    IF NEW.category IS DISTINCT FROM 'pgnotify_status'
            AND EXISTS (SELECT 1 FROM pgnotify.status_webhooks w WHERE w.enabled) THEN
        PERFORM pgnotify.enqueue_status_webhooks(NEW.id, NEW.status, NEW.status, NEW.channel,
                                                 NEW.category, NEW.user_id);
    END IF;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER bench_status_changed AFTER UPDATE OF status ON pgnotify.notifications
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION pgnotify.bench_status_changed();
"""
SHIPPED_TRIGGER = "notifications_statuses_changed"
CONSOLE_INDEXES = {
    "notifications_status_id_idx": "(status, id) INCLUDE (channel, attempts, run_at)",
    "notifications_channel_id_idx": "(channel, id)",
    "notifications_category_id_idx": "(category, id) WHERE category IS NOT NULL",
    "notifications_recipient_idx": "(recipient, id)",
}
# the prepared statement the worker ran before pgnotify.claim() (schema 0023)
CLAIM_BEFORE_0023 = """
WITH ready AS (
    SELECT id FROM pgnotify.notifications
    WHERE status = 'queued' AND channel = $1 AND run_at <= now()
      AND ($5::timestamptz IS NULL OR created_at > $5)
      AND NOT EXISTS (SELECT 1 FROM pgnotify.paused_channels p WHERE p.channel = $1)
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pgnotify.notifications n
    SET status = 'processing', attempts = n.attempts + 1, locked_by = $3,
        locked_until = now() + make_interval(secs => $4), updated_at = now()
    FROM ready WHERE n.id = ready.id
    RETURNING n.id, n.uid::text AS uid, n.channel, n.recipient, n.user_id, n.category,
           n.template, n.subject, n.body, n.html_body, n.locale, n.payload::text AS payload,
           n.priority, n.attempts, n.max_attempts,
           extract(epoch FROM n.created_at)::float8 AS created_at, n.run_at,
           extract(epoch FROM n.expires_at)::float8 AS expires_at, n.digest_of, n.traceparent
)
SELECT id, uid, channel, recipient, user_id, category, template, subject, body, html_body,
       locale, payload, priority, attempts, max_attempts, created_at, expires_at, digest_of,
       traceparent, now() AS claimed_at
FROM claimed
ORDER BY priority DESC, run_at, id
"""

# the complete statement without its audit event (the `logged` CTE)
COMPLETE_NO_EVENT = queries.COMPLETE.split("), logged AS (")[0] + ")\nSELECT id FROM done"


@dataclass
class Variant:
    name: str
    setup: list[str] = field(default_factory=list)
    teardown: list[str] = field(default_factory=list)
    batch: int = 50
    complete: str = queries.COMPLETE
    claim: str = queries.CLAIM


def variants() -> list[Variant]:
    off = f"ALTER TABLE pgnotify.notifications DISABLE TRIGGER {SHIPPED_TRIGGER}"
    on = f"ALTER TABLE pgnotify.notifications ENABLE TRIGGER {SHIPPED_TRIGGER}"
    return [
        Variant("as shipped (status NOTIFY per statement, 0023)"),
        Variant(
            "status NOTIFY as a row trigger (0018)",
            [off, ROW_TRIGGER_0018],
            [
                "DROP TRIGGER bench_status_changed ON pgnotify.notifications",
                "DROP FUNCTION pgnotify.bench_status_changed()",
                on,
            ],
        ),
        Variant("claim as a prepared statement (before 0023)", claim=CLAIM_BEFORE_0023),
        Variant(
            "both as before 0023 (row trigger, prepared claim)",
            [off, ROW_TRIGGER_0018],
            [
                "DROP TRIGGER bench_status_changed ON pgnotify.notifications",
                "DROP FUNCTION pgnotify.bench_status_changed()",
                on,
            ],
            claim=CLAIM_BEFORE_0023,
        ),
        Variant("no status NOTIFY", [off], [on]),
        Variant("no audit event", complete=COMPLETE_NO_EVENT),
        Variant(
            "no console list indexes (0020)",
            [f"DROP INDEX pgnotify.{name}" for name in CONSOLE_INDEXES],
            [f"CREATE INDEX {n} ON pgnotify.notifications {d}" for n, d in CONSOLE_INDEXES.items()],
        ),
        Variant("claim batches of 12", batch=12),
        Variant("claim batches of 25", batch=25),
        Variant(
            "claim batches of 25, as before 0023",
            [off, ROW_TRIGGER_0018],
            [
                "DROP TRIGGER bench_status_changed ON pgnotify.notifications",
                "DROP FUNCTION pgnotify.bench_status_changed()",
                on,
            ],
            batch=25,
            claim=CLAIM_BEFORE_0023,
        ),
    ]


def backend_cpu(pid: int) -> float:
    """User + system CPU seconds of a local PostgreSQL backend."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute("TRUNCATE pgnotify.notifications CASCADE")
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', 'https://hooks.example.com/orders', "
        "jsonb_build_object('seq', g, 'text', 'an order was paid') FROM generate_series(1, $1) g",
        rows,
    )
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    await conn.execute("CHECKPOINT")


async def drain(conn: asyncpg.Connection, v: Variant) -> tuple[int, float, float]:
    """Claim and complete (sent) until nothing is ready; CPU and wall µs per notification."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    cpu0, t0, done = backend_cpu(pid), time.perf_counter(), 0
    while rows := await conn.fetch(v.claim, "webhook", v.batch, "bench", 60.0, None):
        k = len(rows)
        await conn.fetch(
            v.complete,
            "bench",
            [r["id"] for r in rows],
            [r["attempts"] for r in rows],
            ["sent"] * k,
            ["sent"] * k,
            [0.0] * k,
            [None] * k,
            [None] * k,
            ["webhook"] * k,
            [None] * k,
            [1.5] * k,
            [None] * k,
            [0] * k,
            [None] * k,
            [r["claimed_at"] for r in rows],
        )
        done += k
    wall = time.perf_counter() - t0
    return done, (backend_cpu(pid) - cpu0) / done * 1e6, wall / done * 1e6


async def bench(rounds: int, rows: int) -> str:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        conn = await asyncpg.connect(cluster.dsn())
        version = await conn.fetchval("SHOW server_version")
        await migrate.migrate(conn)
        listener = await asyncpg.connect(cluster.dsn())  # an app LISTENing, as in production
        heard = 0

        def on_status(*_: object) -> None:
            nonlocal heard
            heard += 1

        await listener.add_listener("pgnotify_status", on_status)
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for v in variants():
                await fill(conn, rows)
                for sql in v.setup:
                    await conn.execute(sql)
                try:
                    done, cpu_us, wall_us = await drain(conn, v)
                finally:
                    for sql in v.teardown:
                        await conn.execute(sql)
                assert done == rows, (v.name, done)
                results.setdefault(v.name, []).append((cpu_us, wall_us))
        await listener.close()
        await conn.close()
    finally:
        cluster.stop()
    base = statistics.median(c for c, _ in next(iter(results.values())))
    lines = [
        "## PostgreSQL cost of the worker's claim + complete path (`python -m bench.pg_path`)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {version} (own throwaway cluster, fsync on)",
        f"- {rows:,} webhook rows per drain, one connection running the worker's CLAIM and "
        f"COMPLETE (sent); {rounds} rounds, variants alternating; one client LISTENing "
        f"(heard {heard:,} status NOTIFYs)",
        "",
        "| variant | PostgreSQL CPU µs/notification (median) | vs shipped | wall µs/notification |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        lines.append(f"| {name} | {cpu:.1f} | {cpu / base:.2f} | {wall:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers are not meaningful")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rounds, rows = (1, 500) if args.smoke else (args.rounds, args.rows)
    table = asyncio.run(bench(rounds, rows))
    print(table)
    if args.save:
        args.save.write_text(table)


if __name__ == "__main__":
    main()
