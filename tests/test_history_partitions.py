"""Migration 0021: pgnotify.events partitioned by day. An existing installation's events survive
the conversion; retention drops whole old partitions instead of deleting rows; new partitions
carry the roles' rights; inbound reports are still stored once."""

from __future__ import annotations

import asyncpg
import pytest

from pgnotify_worker.adapters import migrate, queries
from tests.support.roles import LoginAs


async def denied(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(sql, *args)


async def partitions(conn: asyncpg.Connection) -> dict[str, dict[str, object]]:
    rows = await conn.fetch("SELECT * FROM pgnotify.event_partitions")
    return {r["partition"]: dict(r) for r in rows}


async def test_events_written_before_the_migration_are_still_read_after_it(
    empty_dsn: str,
) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        before = [m for m in migrate.load_migrations() if m.version < 21]
        await migrate.migrate(conn, before)
        nid = await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')"
        )
        await conn.execute(
            "INSERT INTO pgnotify.events (notification_id, event, attempt, provider, error_code,"
            " error, external_id) VALUES ($1, 'claimed', 1, NULL, NULL, NULL, NULL),"
            " ($1, 'retry_scheduled', 1, 'resend', 'http_503', 'unavailable', NULL),"
            " ($1, 'delivered', 1, 'resend', NULL, NULL, 'evt_1')",
            nid,
        )
        old_ids = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.events ORDER BY id")]

        later = [m.version for m in migrate.load_migrations() if m.version >= 21]
        assert await migrate.migrate(conn) == later and later[0] == 21

        relkind = "SELECT relkind::text FROM pg_class WHERE oid = 'pgnotify.events'::regclass"
        assert await conn.fetchval(relkind) == "p"
        rows = await conn.fetch(
            "SELECT id, event, error FROM pgnotify.events WHERE notification_id = $1 ORDER BY id",
            nid,
        )
        assert [r["id"] for r in rows] == old_ids
        assert [r["event"] for r in rows] == ["claimed", "retry_scheduled", "delivered"]
        # the views that read events read the converted rows
        timeline = await conn.fetch(queries.SHOW_TIMELINE, nid)
        assert [t["event"] for t in timeline] == [
            "queued",
            "claimed",
            "retry_scheduled",
            "delivered",
        ]
        errors = await conn.fetch(queries.RECENT_ERRORS, 10)
        assert [(e["error_code"], e["occurrences"]) for e in errors] == [("http_503", 1)]
        # ids go on from where the old table stopped; today's rows land in the old table's range
        new_id = await conn.fetchval(
            "INSERT INTO pgnotify.events (notification_id, event) VALUES ($1, 'sent') RETURNING id",
            nid,
        )
        assert new_id > max(old_ids)
        parts = await partitions(conn)
        assert "events_before_0021" in parts and "events_default" in parts
        # today is the old table's; tomorrow .. today + 7 are day partitions
        assert sum(1 for p in parts if p.startswith("events_p")) == 7
        # an inbound report seen before the migration is still recognised
        again = await conn.fetchrow(
            queries.PROVIDER_EVENT, "resend", nid, None, "delivered", None, None, None, "evt_1"
        )
        assert again["stored"] == 0
        # a second run of the file changes nothing
        assert await migrate.migrate(conn) == []
    finally:
        await conn.close()


async def test_an_inbound_report_is_stored_once_whatever_partition_holds_it(
    conn: asyncpg.Connection,
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')"
    )
    args = ("resend", nid, None, "delivered", None, None, None, "evt_9")
    assert (await conn.fetchrow(queries.PROVIDER_EVENT, *args))["stored"] == 1
    assert (await conn.fetchrow(queries.PROVIDER_EVENT, *args))["stored"] == 0
    # reports without an external id are never deduplicated
    plain = ("resend", nid, None, "opened", None, None, None, None)
    assert (await conn.fetchrow(queries.PROVIDER_EVENT, *plain))["stored"] == 1
    assert (await conn.fetchrow(queries.PROVIDER_EVENT, *plain))["stored"] == 1


async def test_retention_drops_old_day_partitions_and_keeps_the_rest(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')"
    )
    await conn.execute("INSERT INTO pgnotify.events (notification_id, event) VALUES ($1, 'x')", nid)
    # An installation that has run for months: the converted table is gone and day partitions
    # reach back; one of 2020 holds an old event.
    await conn.execute(
        "ALTER TABLE pgnotify.events DETACH PARTITION pgnotify.events_before_0021;"
        "CREATE TABLE pgnotify.events_p20200101 PARTITION OF pgnotify.events"
        " FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00');"
        "CREATE TABLE pgnotify.events_p20200102 PARTITION OF pgnotify.events"
        " FOR VALUES FROM ('2020-01-02 00:00:00+00') TO ('2020-01-03 00:00:00+00');"
    )
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, created_at)"
        " VALUES ($1, 'sent', '2020-01-01 12:00+00'), ($1, 'sent', '2020-01-02 12:00+00')",
        nid,
    )
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    try:
        # as the built-in job runs it, in the worker's role
        await worker.execute("SELECT pgnotify.maintain_event_partitions()")  # creates only
        assert "events_p20200101" in await partitions(conn)
        await worker.execute("CALL pgnotify.apply_retention()")
        parts = await partitions(conn)
        assert "events_p20200101" not in parts and "events_p20200102" not in parts
        # the old partitions held the only 2020 events; rows of today stay
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pgnotify.events WHERE created_at < '2021-01-01'"
            )
            == 0
        )
        today = "events_p" + (
            await conn.fetchval("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
        )
        assert today in parts
        # but the worker cannot drop a table itself, nor ask for nonsense
        await denied(worker, "DROP TABLE pgnotify." + today)
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await worker.execute("SELECT pgnotify.maintain_event_partitions(ahead => -1)")
    finally:
        await worker.close()


async def test_a_day_without_its_partition_lands_in_the_default_one(
    conn: asyncpg.Connection,
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')"
    )
    # a write a year ahead (no partition yet) is kept, not refused
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, created_at)"
        " VALUES ($1, 'sent', now() + interval '400 days')",
        nid,
    )
    where = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM pgnotify.events WHERE notification_id = $1", nid
    )
    assert where == "pgnotify.events_default"


async def test_new_partitions_give_each_role_what_it_had(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    admin = await asyncpg.connect(await login_as("pgnotify_admin"))
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        assert await worker.fetchval("SELECT pgnotify.maintain_event_partitions(ahead => 20)") > 0
        newest = await conn.fetchval(
            "SELECT partition FROM pgnotify.event_partitions WHERE NOT is_default"
            " ORDER BY range_to DESC LIMIT 1"
        )
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = $1::regclass",
            "pgnotify." + newest,
        )
        assert owner == await conn.fetchval(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'pgnotify.events'::regclass"
        )
        # the worker writes and reads through the parent; admins read every partition
        nid = await worker.fetchval(
            "INSERT INTO pgnotify.events (notification_id, event) VALUES (1, 'sent') RETURNING id"
        )
        assert nid is not None
        assert await worker.fetchval("SELECT count(*) FROM pgnotify.event_partitions") > 8
        assert await admin.fetchval(f"SELECT count(*) FROM pgnotify.{newest}") == 0
        assert await admin.fetchval("SELECT count(*) FROM pgnotify.events_before_0021") == 1
        assert await admin.fetchval("SELECT count(*) FROM pgnotify.event_partitions") > 8
        # producers read no event, through the parent or a partition, and run no upkeep
        await denied(producer, f"SELECT * FROM pgnotify.{newest}")
        await denied(producer, "SELECT * FROM pgnotify.events_default")
        await denied(producer, "SELECT * FROM pgnotify.event_partitions")
        await denied(producer, "SELECT pgnotify.maintain_event_partitions()")
    finally:
        for c in (worker, admin, producer):
            await c.close()


async def test_the_event_partitions_job_is_built_in(conn: asyncpg.Connection) -> None:
    job = await conn.fetchrow(
        "SELECT command, builtin FROM pgnotify.jobs WHERE name = 'event_partitions'"
    )
    assert job["builtin"] and "maintain_event_partitions" in job["command"]
