"""Benchmark (not a test): a big backlog and a day of history. Prints a table.

1. Drain rate with a small backlog (10,000 rows) and with a large one (1,000,000 rows), runs
   interleaved: the large run's rate is measured over its first `window` rows, while the rest
   still wait (what a big backlog costs the claim), then the rest is deleted.
2. PostgreSQL CPU per notification (every postgres process of the throwaway cluster, from /proc)
   while one worker drains, with pgnotify.events partitioned by day (schema 0021) and with it a
   plain table as before 0021, runs interleaved in one database.
3. Retiring one day of events: DROP TABLE of its partition against the batched DELETE that
   retention did before 0021 (wall time, WAL written, postgres CPU).
4. queue_status (behind /status and the queue gauges) with the large backlog waiting.

    python -m bench.scale            # full run (several minutes)
    python -m bench.scale --smoke    # seconds; numbers are not meaningful
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
from typing import Any

import aiohttp
import asyncpg

from bench.run import (
    DURABLE,
    SECRET,
    cpu_seconds,
    machine,
    postgres_pids,
    sink_count,
    wait_http,
)
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port


@dataclass
class Plan:
    runs: int = 3
    small: int = 10_000
    large: int = 1_000_000
    window: int = 20_000
    day_events: int = 1_000_000
    day_notifications: int = 200_000
    days: int = 5


SMOKE = Plan(1, 1_000, 20_000, 1_000, 20_000, 5_000, 3)

# The events table as it was before schema 0021 (a plain table, the same indexes).
PLAIN_EVENTS = """
ALTER TABLE pgnotify.events RENAME TO events_partitioned;
CREATE TABLE pgnotify.events (LIKE pgnotify.events_partitioned INCLUDING DEFAULTS);
ALTER TABLE pgnotify.events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (START WITH 1000000000);
ALTER TABLE pgnotify.events ADD PRIMARY KEY (id);
CREATE INDEX ON pgnotify.events (notification_id, id);
CREATE INDEX ON pgnotify.events (created_at) WHERE error IS NOT NULL;
CREATE UNIQUE INDEX ON pgnotify.events (provider, external_id) WHERE external_id IS NOT NULL;
GRANT SELECT, INSERT, DELETE ON pgnotify.events TO pgnotify_worker;
"""
PARTITIONED_EVENTS = """
DROP TABLE pgnotify.events;
ALTER TABLE pgnotify.events_partitioned RENAME TO events;
"""


async def fill(conn: asyncpg.Connection, url: str, rows: int) -> None:
    """A backlog of ready rows, written the quick way (no per-row INSERT triggers: a million rows
    through them take minutes on a shared machine); the caller wakes the worker."""
    await conn.execute(
        f"""
        SET session_replication_role = replica;
        INSERT INTO pgnotify.notifications
            (channel, recipient, payload, priority, status, max_attempts, run_at)
        SELECT 'webhook', '{url}', jsonb_build_object('seq', g), 0, 'queued', 5, now()
        FROM generate_series(1, {int(rows)}) g;
        RESET session_replication_role;
        """
    )


async def clear(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")


async def drain(
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    sink_port: int,
    rows: int,
    window: int,
    pg: list[int],
    http_port: int = 0,
) -> dict[str, float]:
    """Insert `rows`, time the sink receiving the first `window` of them; postgres CPU/row.
    With `http_port`, also time the worker's /status and /metrics meanwhile."""
    url = f"http://127.0.0.1:{sink_port}/hook"
    await http.post(f"http://127.0.0.1:{sink_port}/reset")

    async def pages() -> dict[str, float]:
        timed: dict[str, float] = {}
        for page in ("status", "metrics"):
            times = []
            for _ in range(3):
                begun = time.monotonic()
                async with http.get(f"http://127.0.0.1:{http_port}/{page}") as resp:
                    await resp.read()
                times.append(1000 * (time.monotonic() - begun))
            timed[f"{page}_ms"] = statistics.median(times)
        return timed

    # the small run times the pages on an idle queue, the large one with its backlog waiting
    timed = await pages() if http_port and rows <= window else {}
    await fill(conn, url, rows)
    await conn.execute("ANALYZE pgnotify.notifications")
    if http_port and rows > window:
        timed = await pages()
    print(f"draining {rows:,} rows (timing {window:,} of them)", file=sys.stderr, flush=True)
    base = await sink_count(http, sink_port)  # a poll may have started early: not counted
    target = min(base + window, rows)
    cpu0, started = cpu_seconds(pg), time.monotonic()
    await conn.execute("SELECT pg_notify('pgnotify', 'webhook')")  # as a producer's commit
    async with asyncio.timeout(900):
        while await sink_count(http, sink_port) < target:
            await asyncio.sleep(0.05)
    seconds = time.monotonic() - started
    cpu = cpu_seconds(pg) - cpu0
    got = await sink_count(http, sink_port)
    await conn.execute("DELETE FROM pgnotify.notifications WHERE status = 'queued'")
    async with asyncio.timeout(120):  # the claimed rest finishes
        while await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status = 'processing'"
        ):
            await asyncio.sleep(0.05)
    await clear(conn)
    return {
        "per_second": (target - base) / seconds,
        "pg_us": 1e6 * cpu / max(got - base, 1),
        **timed,
    }


async def queue_status_ms(conn: asyncpg.Connection, url: str, rows: int) -> float:
    await fill(conn, url, rows)
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    times: list[float] = []
    for _ in range(5):
        started = time.monotonic()
        await conn.fetch("SELECT * FROM pgnotify.queue_status")
        times.append(1000 * (time.monotonic() - started))
    await clear(conn)
    return statistics.median(times)


async def retire_day(conn: asyncpg.Connection, rows: int, pg: list[int]) -> dict[str, Any]:
    """One day of events: DROP its partition vs retention's batched DELETE (before 0021)."""

    async def measured(sql: str) -> tuple[float, float, float]:
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
        cpu0, started = cpu_seconds(pg), time.monotonic()
        await conn.execute(sql)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(pg) - cpu0
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn0)
        return seconds, cpu, float(wal) / 2**20

    day = "2020-01-01 00:00:00+00"
    fill_day = f"""
        INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider,
                                     duration_ms, created_at)
        SELECT g / 2, CASE WHEN g % 2 = 0 THEN 'claimed' ELSE 'sent' END, 1, 'w1', 'webhook',
               1.5, '{day}'::timestamptz + make_interval(secs => g % 86400)
        FROM generate_series(1, {rows}) g
    """
    await conn.execute(
        "ALTER TABLE pgnotify.events DETACH PARTITION pgnotify.events_before_0021;"
        "CREATE TABLE pgnotify.events_p20200101 PARTITION OF pgnotify.events"
        f" FOR VALUES FROM ('{day}') TO ('2020-01-02 00:00:00+00');"
        "CREATE INDEX ON pgnotify.events_p20200101 (id)"
    )
    await conn.execute(fill_day)
    await conn.execute("CHECKPOINT")
    drop = await measured("DROP TABLE pgnotify.events_p20200101")
    # Before 0021 the same rows sat in the one events table and retention deleted them with
    # their notifications, 5,000 notifications (10,000 events) per committed batch.
    await conn.execute(PLAIN_EVENTS)
    await conn.execute(fill_day)
    await conn.execute("CHECKPOINT")
    batches = f"""
    DO $$
    DECLARE lo bigint := 0;
    BEGIN
        WHILE lo <= {rows // 2} LOOP
            DELETE FROM pgnotify.events WHERE notification_id >= lo AND notification_id < lo + 5000;
            lo := lo + 5000;
        END LOOP;
    END $$
    """
    delete = await measured(batches)
    vacuum = await measured("VACUUM pgnotify.events")
    await conn.execute(PARTITIONED_EVENTS)
    return {"drop": drop, "delete": delete, "vacuum": vacuum}


OLD_RETENTION = """
CREATE PROCEDURE pgnotify.apply_retention_before_0021(keep interval, keep_dead interval,
                                                      batch integer DEFAULT 5000)
LANGUAGE plpgsql AS $fn$
DECLARE
    removed integer;
BEGIN
    LOOP
        WITH doomed AS (
            SELECT id FROM pgnotify.notifications
            WHERE (status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired')
                   AND updated_at < now() - keep)
               OR (status IN ('dead', 'failed') AND updated_at < now() - keep_dead)
            LIMIT batch
            FOR UPDATE SKIP LOCKED
        ), inbox_gone AS (
            DELETE FROM pgnotify.inbox i USING doomed
            WHERE i.notification_id = doomed.id AND i.read_at IS NOT NULL
        )
        DELETE FROM pgnotify.notifications n USING doomed WHERE n.id = doomed.id;
        GET DIAGNOSTICS removed = ROW_COUNT;
        COMMIT;
        EXIT WHEN removed < batch;
    END LOOP;
END
$fn$
"""


async def retire_notifications(
    conn: asyncpg.Connection, per_day: int, days: int, pg: list[int]
) -> dict[str, Any]:
    """The oldest of `days` days of sent notifications: retention before 0021 (each batch
    searches the table) against now (each batch walks the primary key); the events are apart."""
    total = per_day * days
    fill = f"""
        SET session_replication_role = replica;
        INSERT INTO pgnotify.notifications
            (channel, recipient, payload, priority, status, max_attempts, run_at, attempts,
             sent_at, created_at, updated_at)
        SELECT 'webhook', 'https://example.com/hook', '{{}}', 0, 'sent', 5, t, 1, t, t, t
        FROM (SELECT now() - make_interval(secs => ({total} - g) * 86400.0 / {per_day}) AS t
              FROM generate_series(1, {total}) g) s;
        RESET session_replication_role;
    """
    keep = f"{days - 1} days"
    await conn.execute(OLD_RETENTION)
    out: dict[str, Any] = {}
    for name, call in (
        ("before", f"CALL pgnotify.apply_retention_before_0021('{keep}', '{keep}')"),
        ("after", f"CALL pgnotify.apply_retention('{keep}', '{keep}')"),
    ):
        await conn.execute("TRUNCATE pgnotify.notifications")
        await conn.execute(fill)
        await conn.execute("VACUUM ANALYZE pgnotify.notifications")
        await conn.execute("CHECKPOINT")
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
        cpu0, started = cpu_seconds(pg), time.monotonic()
        await conn.execute(call)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(pg) - cpu0
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn0)
        left = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications")
        out[name] = (seconds, cpu, float(wal) / 2**20, total - left)
    await conn.execute("DROP PROCEDURE pgnotify.apply_retention_before_0021")
    await conn.execute("TRUNCATE pgnotify.notifications")
    return out


async def bench(
    plan: Plan, history_only: bool = False, drain_only: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    cluster = TempCluster(settings=DURABLE).start()
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    worker: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = {"small": [], "large": [], "plain": [], "partitioned": []}
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE scale")
        await admin.execute(
            "ALTER DATABASE scale SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        version = await admin.fetchval("SHOW server_version")
        await admin.close()
        dsn = cluster.dsn("scale")
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        env = {
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
        }
        if history_only:
            out["retire"] = await retire_day(conn, plan.day_events, postgres_pids(cluster))
            out["retention"] = await retire_notifications(
                conn, plan.day_notifications, plan.days, postgres_pids(cluster)
            )
            await conn.close()
            return out, {**machine(), "postgresql": f"{version} (own throwaway cluster, fsync on)"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "pgnotify_worker", "run"], env=env, stdout=subprocess.DEVNULL
        )
        await wait_http(f"http://127.0.0.1:{sink_port}/stats")
        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
        pg = postgres_pids(cluster)
        async with aiohttp.ClientSession() as http:
            for _ in range(plan.runs):
                out["small"].append(
                    await drain(conn, http, sink_port, plan.small, plan.small, pg, http_port)
                )
                out["large"].append(
                    await drain(conn, http, sink_port, plan.large, plan.window, pg, http_port)
                )
            # PostgreSQL CPU per notification: partitioned events (now) vs a plain table
            for _ in range(0 if drain_only else plan.runs):
                for shape in ("partitioned", "plain"):
                    if shape == "plain":
                        await conn.execute(PLAIN_EVENTS)
                    out[shape].append(
                        await drain(conn, http, sink_port, plan.small, plan.small, pg)
                    )
                    if shape == "plain":
                        await conn.execute(PARTITIONED_EVENTS)
            url = f"http://127.0.0.1:{sink_port}/hook"
            worker.terminate()
            worker.wait(30)
            worker = None
            if not drain_only:
                out["status_small_ms"] = await queue_status_ms(conn, url, plan.small)
                out["status_large_ms"] = await queue_status_ms(conn, url, plan.large)
        if not drain_only:
            out["retire"] = await retire_day(conn, plan.day_events, postgres_pids(cluster))
            out["retention"] = await retire_notifications(
                conn, plan.day_notifications, plan.days, postgres_pids(cluster)
            )
        await conn.close()
    finally:
        for proc in (worker, sink):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        cluster.destroy()
    info = machine()
    info["postgresql"] = f"{version} (own throwaway cluster, fsync on)"
    return out, info


def report(out: dict[str, Any], info: dict[str, str], plan: Plan) -> str:
    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in out[key])

    lines = [
        f"Machine: {info['cpu']}, {info.get('memory', '?')}; PostgreSQL {info['postgresql']}; "
        f"one worker, webhook concurrency 50; medians of {plan.runs} interleaved runs.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if out["small"]:
        small, large = med("small", "per_second"), med("large", "per_second")
        lines += [
            f"| drain, {plan.small:,}-row backlog, notifications/s | {small:,.0f} |",
            f"| drain, {plan.large:,}-row backlog (first {plan.window:,}), notifications/s "
            f"| {large:,.0f} |",
            f"| large / small | {large / small:.2f} |",
            "| runs, small / large | "
            + ", ".join(f"{r['per_second']:,.0f}" for r in out["small"])
            + " / "
            + ", ".join(f"{r['per_second']:,.0f}" for r in out["large"])
            + " |",
            f"| GET /status, idle / {plan.large:,} rows waiting "
            f"| {med('small', 'status_ms'):.0f} / {med('large', 'status_ms'):.0f} ms |",
            f"| GET /metrics, idle / {plan.large:,} rows waiting "
            f"| {med('small', 'metrics_ms'):.1f} / {med('large', 'metrics_ms'):.1f} ms |",
        ]
    if out["partitioned"]:
        part, plain = med("partitioned", "pg_us"), med("plain", "pg_us")
        lines += [
            f"| PostgreSQL CPU per notification, events partitioned (0021) | {part:.0f} µs |",
            f"| PostgreSQL CPU per notification, events a plain table (before) | {plain:.0f} µs |",
        ]
    if "status_small_ms" in out:
        lines += [
            f"| queue_status, {plan.small:,} ready rows | {out['status_small_ms']:.1f} ms |",
            f"| queue_status, {plan.large:,} ready rows | {out['status_large_ms']:.1f} ms |",
        ]
    if "retire" not in out:
        return "\n".join(lines)
    drop, delete, vacuum = (out["retire"][k] for k in ("drop", "delete", "vacuum"))
    before, after = out["retention"]["before"], out["retention"]["after"]
    lines += [
        f"| retire a day of {plan.day_events:,} events: DROP TABLE partition "
        f"| {1000 * drop[0]:.1f} ms, {drop[2]:.2f} MB WAL, {drop[1]:.2f} s pg CPU |",
        f"| the same rows by batched DELETE (retention before 0021) "
        f"| {1000 * delete[0]:,.0f} ms, {delete[2]:,.1f} MB WAL, {delete[1]:.2f} s pg CPU |",
        f"| ... then VACUUM of the dead rows "
        f"| {1000 * vacuum[0]:,.0f} ms, {vacuum[2]:,.1f} MB WAL, {vacuum[1]:.2f} s pg CPU |",
        f"| retire the oldest of {plan.days} days of {plan.day_notifications:,} notifications, "
        f"retention before 0021 | {before[3]:,} rows, {1000 * before[0]:,.0f} ms, "
        f"{before[2]:,.1f} MB WAL, {before[1]:.2f} s pg CPU |",
        f"| the same with 0021's retention (primary-key batches) | {after[3]:,} rows, "
        f"{1000 * after[0]:,.0f} ms, {after[2]:,.1f} MB WAL, {after[1]:.2f} s pg CPU |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers not meaningful")
    parser.add_argument("--runs", type=int, help="interleaved runs per figure")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--history-only", action="store_true", help="only the retiring figures (no worker)"
    )
    parser.add_argument("--drain-only", action="store_true", help="only the drain rates")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.runs:
        plan.runs = args.runs
    out, info = asyncio.run(bench(plan, args.history_only, args.drain_only))
    table = report(out, info, plan)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
