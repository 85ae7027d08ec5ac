"""A cheap producer INSERT (schema 0022): the idempotency lookup always uses the unique index (a
keyed batch into an empty, freshly analysed queue is linear, not quadratic), and a contact's time
zone is checked with an index lookup, as strictly as before."""

from __future__ import annotations

import time
import zoneinfo
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from tests.support.roles import LoginAs

KEYED_INSERT = (
    "INSERT INTO pgnotify.notifications (channel, recipient, payload, idempotency_key) "
    "SELECT 'webhook', 'https://hooks.example.com/in', jsonb_build_object('n', i), 'k-' || i "
    "FROM generate_series(1, $1::int) AS i"
)
LOOKUP = (
    "SELECT n.* FROM pgnotify.notifications n "
    "WHERE n.idempotency_key = $1 AND n.idempotency_key IS NOT NULL"
)


async def fresh_session(dsn: str) -> asyncpg.Connection:
    """A new session (no cached trigger plans) on an empty, freshly analysed queue."""
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute("TRUNCATE pgnotify.notifications CASCADE")
        await setup.execute("VACUUM ANALYZE pgnotify.notifications")
    finally:
        await setup.close()
    return await asyncpg.connect(dsn)


async def test_the_idempotency_lookup_is_an_index_scan_on_an_empty_analysed_queue(
    dsn: str,
) -> None:
    conn = await fresh_session(dsn)
    try:
        # The trigger function plans under its own settings; its plan as PL/pgSQL caches it
        # (generic) on the empty table is the unique index, never a scan of the table.
        config = await conn.fetchval(
            "SELECT proconfig FROM pg_proc WHERE oid = 'pgnotify.check_idempotency_key()'::regprocedure"
        )
        assert "enable_seqscan=off" in config
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE lookup(text) AS {LOOKUP}")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE lookup('k-1')"))
            await conn.execute("DEALLOCATE lookup")
        assert "notifications_idempotency_key_idx" in plan, plan
        assert "Seq Scan" not in plan, plan

        # What the trigger really did for 2,000 keyed rows in one statement: one index scan a
        # row, no sequential scan of the table (the counters of this transaction).
        async with conn.transaction():
            await conn.execute(KEYED_INSERT, 2000)
            seq, idx = await conn.fetchrow(
                "SELECT pg_stat_get_xact_numscans('pgnotify.notifications'::regclass), "
                "pg_stat_get_xact_numscans('pgnotify.notifications_idempotency_key_idx'::regclass)"
            )
        assert seq < 10, f"{seq} sequential scans of notifications for 2,000 keyed rows"
        assert idx >= 2000
    finally:
        await conn.close()


async def timed_insert(dsn: str, rows: int, keyed: bool = True) -> float:
    conn = await fresh_session(dsn)
    try:
        started = time.perf_counter()
        await conn.execute(
            KEYED_INSERT if keyed else KEYED_INSERT.replace("'k-' || i", "NULL"), rows
        )
        took = time.perf_counter() - started
        assert await conn.fetchval("SELECT count(idempotency_key) FROM pgnotify.notifications") == (
            rows if keyed else 0
        )
        return took
    finally:
        await conn.close()


async def timed_enqueue_many(dsn: str, rows: int) -> float:
    conn = await fresh_session(dsn)
    try:
        started = time.perf_counter()
        ids = await conn.fetchval(
            "SELECT pgnotify.enqueue_many(jsonb_agg(jsonb_build_object('channel', 'webhook', "
            "'recipient', 'https://hooks.example.com/in', 'payload', jsonb_build_object('n', i), "
            "'idempotency_key', 'm-' || i))) FROM generate_series(1, $1::int) AS i",
            rows,
        )
        took = time.perf_counter() - started
        assert len(ids) == rows
        return took
    finally:
        await conn.close()


@pytest.mark.parametrize("insert", [timed_insert, timed_enqueue_many])
async def test_a_keyed_batch_into_an_empty_queue_takes_time_linear_in_rows(
    dsn: str, insert: Callable[[str, int], Awaitable[float]]
) -> None:
    small = min([await insert(dsn, 1000) for _ in range(2)])
    large = min([await insert(dsn, 5000) for _ in range(2)])
    # Linear: about 5x (7x measured: a bigger index). Quadratic (a scan of the table a row, as
    # before 0022): 20-25x.
    assert large < 15 * small, f"1,000 rows {small:.3f} s, 5,000 rows {large:.3f} s"


async def test_a_key_costs_a_keyed_batch_a_constant_a_row(dsn: str) -> None:
    keyed = min([await timed_insert(dsn, 5000) for _ in range(2)])
    plain = min([await timed_insert(dsn, 5000, keyed=False) for _ in range(2)])
    # One index lookup a row (about 1.5x measured); a table scan a row: about 20x.
    assert keyed < 5 * plain, f"5,000 rows: {keyed:.3f} s keyed, {plain:.3f} s without keys"


async def test_time_zones_are_checked_as_strictly_as_zoneinfo(conn: asyncpg.Connection) -> None:
    names = [r[0] for r in await conn.fetch("SELECT name FROM pgnotify.timezone_names")]
    assert {"UTC", "Europe/Paris", "America/Argentina/Buenos_Aires"} <= set(names)
    unknown = []
    for name in names:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            unknown.append(name)
    assert unknown == [], "names the worker's zoneinfo refuses"

    for good in ("UTC", "Europe/Paris", "Asia/Tokyo", "America/Argentina/Buenos_Aires"):
        await conn.execute(
            "INSERT INTO pgnotify.contacts (user_id, timezone) VALUES ($1, $2)", "u-" + good, good
        )
    # Abbreviations, POSIX strings and offsets PostgreSQL's AT TIME ZONE would take, but zoneinfo
    # (the worker) refuses; wrong case; unknown names.
    for bad in ("CEST", "UTC+3", "+03:00", "europe/paris", "Europe/Paris ", "Mars/Olympus", ""):
        with pytest.raises(asyncpg.CheckViolationError, match="unknown time zone") as refused:
            await conn.execute(
                "INSERT INTO pgnotify.contacts (user_id, timezone) VALUES ('bad', $1)", bad
            )
        assert refused.value.column_name == "timezone"
        with pytest.raises((zoneinfo.ZoneInfoNotFoundError, ValueError)):
            zoneinfo.ZoneInfo(bad)
    with pytest.raises(asyncpg.CheckViolationError, match="unknown time zone"):
        await conn.execute(
            "UPDATE pgnotify.contacts SET timezone = 'CET+1' WHERE user_id = 'u-UTC'"
        )


async def test_a_zone_missing_from_the_copy_is_still_looked_up_and_refresh_restores_it(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("DELETE FROM pgnotify.timezone_names WHERE name = 'Asia/Tokyo'")
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, timezone) VALUES ('t', 'Asia/Tokyo')"
    )
    await conn.execute("INSERT INTO pgnotify.timezone_names VALUES ('Mars/Olympus')")
    assert await conn.fetchval("SELECT pgnotify.refresh_timezone_names()") == 2
    assert await conn.fetchval(
        "SELECT array_agg(name ORDER BY name) FROM pgnotify.timezone_names "
        "WHERE name IN ('Asia/Tokyo', 'Mars/Olympus')"
    ) == ["Asia/Tokyo"]


async def test_the_admin_may_refresh_and_a_producer_may_write_contacts(
    dsn: str, login_as: LoginAs
) -> None:
    admin = await asyncpg.connect(await login_as("pgnotify_admin"))
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        assert await admin.fetchval("SELECT pgnotify.refresh_timezone_names()") == 0
        await producer.execute(
            "INSERT INTO pgnotify.contacts (user_id, timezone) VALUES ('p', 'Europe/Berlin')"
        )
    finally:
        await admin.close()
        await producer.close()


async def test_loading_many_contacts_costs_an_index_lookup_a_zone(conn: asyncpg.Connection) -> None:
    started = time.perf_counter()
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, timezone) "
        "SELECT 'c-' || i, 'c' || i || '@example.com', "
        "(ARRAY['Europe/Paris', 'Asia/Tokyo', 'America/New_York', 'UTC'])[1 + i % 4] "
        "FROM generate_series(1, 2000) AS i"
    )
    took = time.perf_counter() - started
    # pg_timezone_names per row: tens of ms each (a minute for 2,000 on a loaded machine); an
    # index lookup: well under a second.
    assert took < 10, f"2,000 contacts took {took:.1f} s"
