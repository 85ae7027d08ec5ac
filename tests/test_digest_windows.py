"""Schema 0025: the daily/weekly digest is a batching window. A row held for a digest joins the
window of its recipient, channel and kind, which closes at the recipient's next local digest
moment (DST-correct); the window's notification is the digest, closed like every batch."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import asyncpg

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters import migrate
from tests.support.db import wait_rows
from tests.support.worker import running, settings_for

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


async def paris(conn: asyncpg.Connection, user: str = "pia", locale: str | None = None) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, timezone, locale) "
        "VALUES ($1, $1 || '@example.com', 'Europe/Paris', $2)",
        user,
        locale,
    )


async def enqueue(conn: asyncpg.Connection, subject: str, user: str = "pia") -> int:
    nid: int = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', $2 || '@example.com', subject => $1, body => 'x', "
        "user_id => $2, category => 'billing')",
        subject,
        user,
    )
    return nid


async def hold(conn: asyncpg.Connection, ids: list[int], kind: str, held_at: dt.datetime) -> None:
    """What the worker's completer does for a daily/weekly preference (status held, hold kind)."""
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'held', hold = $2, held_at = $3 "
        "WHERE id = ANY($1)",
        ids,
        kind,
        held_at,
    )


async def test_the_digest_moment_is_the_recipients_local_hour_across_dst_changes(
    conn: asyncpg.Connection,
) -> None:
    closes = "SELECT pgnotify.digest_closes_at($1, $2, $3, $4, $5)"
    # Paris springs forward on Sunday 2026-03-29 (01:00 UTC): 08:00 local is 07:00 UTC on the
    # Saturday, 06:00 UTC on the Sunday; it falls back on 2026-10-25: 06:00 UTC, then 07:00 UTC
    cases = [
        ("daily", "Europe/Paris", "2026-03-28 06:00", 8, 1, "2026-03-28 07:00"),
        ("daily", "Europe/Paris", "2026-03-28 07:00", 8, 1, "2026-03-29 06:00"),  # strictly after
        ("daily", "Europe/Paris", "2026-03-28 10:00", 8, 1, "2026-03-29 06:00"),
        ("daily", "Europe/Paris", "2026-10-24 10:00", 8, 1, "2026-10-25 07:00"),
        ("weekly", "Europe/Paris", "2026-03-28 10:00", 8, 1, "2026-03-30 06:00"),  # Monday
        ("weekly", "Europe/Paris", "2026-03-23 07:00", 8, 1, "2026-03-30 06:00"),  # the moment
        ("weekly", "America/New_York", "2026-03-07 12:00", 8, 7, "2026-03-08 12:00"),
        ("daily", "Not/AZone", "2026-03-28 10:00", 8, 1, "2026-03-29 08:00"),  # unknown: UTC
        ("daily", None, "2026-03-28 10:00", 0, 1, "2026-03-29 00:00"),
    ]
    for kind, zone, after, hour, weekday, want in cases:
        got = await conn.fetchval(closes, kind, zone, at(after), hour, weekday)
        assert got == at(want), (kind, zone, after)


async def test_a_digest_window_closes_at_the_local_eight_after_a_dst_change(
    conn: asyncpg.Connection,
) -> None:
    await paris(conn)
    ids = [await enqueue(conn, s) for s in ("first", "second")]
    await hold(conn, ids[:1], "daily", at("2026-03-28 10:00"))  # Saturday, before the change
    await hold(conn, ids[1:], "daily", at("2026-03-29 05:30"))  # Sunday, after it
    (window,) = await conn.fetch("SELECT * FROM pgnotify.batches")
    assert (window["reason"], window["batch_key"], window["category"], window["items"]) == (
        "digest",
        "daily",
        "digest",
        2,
    )
    assert window["closes_at"] == at("2026-03-29 06:00")  # 08:00 CEST, not 07:00 UTC
    digest = await conn.fetchrow(
        "SELECT * FROM pgnotify.notifications WHERE id = $1", window["notification_id"]
    )
    assert (digest["status"], digest["digest_of"], digest["category"]) == (
        "scheduled",
        "daily",
        "digest",
    )
    build = "SELECT pgnotify.build_digests('daily', $1)"
    assert await conn.fetchval(build, at("2026-03-29 05:59")) == 0  # 07:59 local: not yet
    assert await conn.fetchval(build, at("2026-03-29 06:00")) == 1
    assert await conn.fetchval(build, at("2026-03-29 06:05")) == 0  # closed once
    digest = await conn.fetchrow(
        "SELECT * FROM pgnotify.notifications WHERE id = $1", window["notification_id"]
    )
    assert digest["status"] == "queued"
    assert [i["subject"] for i in digest["payload"]["items"]] == ["first", "second"]
    assert digest["payload"]["count"] == 2 and digest["payload"]["kind"] == "daily"
    items = await conn.fetch(
        "SELECT status, digest_id, hold FROM pgnotify.notifications WHERE id = ANY($1)", ids
    )
    assert {tuple(r) for r in items} == {("digested", digest["id"], "daily")}
    # a row held after the close opens the next window, at the next local eight
    later = await enqueue(conn, "third")
    await hold(conn, [later], "daily", at("2026-03-29 06:30"))
    assert await conn.fetchval(
        "SELECT closes_at FROM pgnotify.batches WHERE closed_at IS NULL"
    ) == at("2026-03-30 06:00")


async def test_concurrent_holds_make_exactly_one_digest_per_window(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await paris(conn)
    await paris(conn, "bo")
    ids = {
        user: [await enqueue(conn, f"{user}{i}", user) for i in range(15)] for user in ("pia", "bo")
    }
    completers = [await asyncpg.connect(dsn) for _ in range(10)]
    start = asyncio.Event()

    async def complete(c: asyncpg.Connection, k: int) -> None:
        await start.wait()
        for user in ("pia", "bo"):
            mine = [nid for i, nid in enumerate(ids[user]) if i % len(completers) == k]
            for nid in mine:  # one row per transaction, as workers write outcomes back
                await c.execute(
                    "UPDATE pgnotify.notifications SET status = 'held', hold = 'weekly', "
                    "held_at = now() WHERE id = $1",
                    nid,
                )

    try:
        tasks = [asyncio.create_task(complete(c, k)) for k, c in enumerate(completers)]
        start.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    finally:
        for c in completers:
            await c.close()
    windows = await conn.fetch(
        "SELECT recipient, items, notification_id FROM pgnotify.batches ORDER BY recipient"
    )
    assert [(w["recipient"], w["items"]) for w in windows] == [
        ("bo@example.com", 15),
        ("pia@example.com", 15),
    ]
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE digest_of = 'weekly'"
        )
        == 2
    )
    far = dt.datetime.now(UTC) + dt.timedelta(days=8)
    assert await conn.fetchval("SELECT pgnotify.build_digests('weekly', $1)", far) == 2
    for w in windows:
        payload = await conn.fetchval(
            "SELECT payload FROM pgnotify.notifications WHERE id = $1", w["notification_id"]
        )
        assert len(payload["items"]) == 15
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.notifications WHERE status = 'digested'")
        == 30
    )


async def test_changing_the_digest_hour_re_aims_the_open_windows(conn: asyncpg.Connection) -> None:
    await paris(conn)
    nid = await enqueue(conn, "first")
    await hold(conn, [nid], "daily", at("2026-03-28 10:00"))
    assert await conn.fetchval("SELECT closes_at FROM pgnotify.batches") == at("2026-03-29 06:00")
    # the digest job passes the worker's settings: 18:00 local from now on
    assert (
        await conn.fetchval(
            "SELECT pgnotify.build_digests('daily', $1, 18)", at("2026-03-28 16:00")
        )
        == 0
    )
    assert await conn.fetchval("SELECT closes_at FROM pgnotify.batches") == at("2026-03-28 17:00")
    assert (
        await conn.fetchval("SELECT local_hour FROM pgnotify.digest_schedule WHERE kind = 'daily'")
        == 18
    )
    assert (
        await conn.fetchval("SELECT pgnotify.build_digests('daily', $1)", at("2026-03-28 17:00"))
        == 1
    )


async def test_a_window_whose_items_were_all_cancelled_sends_nothing(
    conn: asyncpg.Connection,
) -> None:
    await paris(conn)
    nid = await enqueue(conn, "gone")
    await hold(conn, [nid], "daily", at("2026-03-28 10:00"))
    assert await conn.fetchval("SELECT pgnotify.cancel($1)", nid) is True
    assert await conn.fetchval("SELECT pgnotify.build_digests('daily', now())") == 0
    digest = await conn.fetchrow("SELECT * FROM pgnotify.notifications WHERE digest_of = 'daily'")
    assert (digest["status"], digest["last_error"]) == (
        "cancelled",
        "every item of the batch was cancelled",
    )


async def test_rows_held_before_the_migration_are_delivered_after_it(
    empty_dsn: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(empty_dsn)
    await dbmod._init_connection(conn)
    try:
        await migrate.migrate(conn, [m for m in migrate.load_migrations() if m.version < 25])
        await paris(conn, locale="fr")
        await conn.execute(
            "INSERT INTO pgnotify.templates (key, channel, locale, subject, body) VALUES "
            "('invoice', 'email', '', 'Invoice {{ n }}', 'Pay'), "
            "('invoice', 'email', 'fr', 'Facture {{ n }}', 'Payez')"
        )
        newer = await enqueue(conn, "newer")  # the lowest id, held last
        old = [
            await conn.fetchval(
                "SELECT pgnotify.enqueue('email', 'pia@example.com', user_id => 'pia', "
                "category => 'billing', template => 'invoice', payload => $1, locale => 'fr')",
                {"n": n},
            )
            for n in (1, 2)
        ]
        recent = await enqueue(conn, "recent")
        # held by the old worker: two days ago (their 08:00 has passed), and just now
        await conn.execute(
            "UPDATE pgnotify.notifications SET status = 'held', hold = 'daily', "
            "held_at = now() - interval '2 days' WHERE id = ANY($1)",
            old,
        )
        await hold(conn, [recent], "weekly", dt.datetime.now(UTC))
        await hold(conn, [newer], "daily", dt.datetime.now(UTC) - dt.timedelta(minutes=1))

        assert await migrate.migrate(conn) == list(range(25, SCHEMA_VERSION + 1))
        windows = await conn.fetch("SELECT * FROM pgnotify.batches ORDER BY batch_key")
        assert [(w["batch_key"], w["items"]) for w in windows] == [("daily", 3), ("weekly", 1)]
        # the window closes at the moment after its oldest item: passed, so it goes out at once
        assert windows[0]["closes_at"] < dt.datetime.now(UTC) - dt.timedelta(hours=12)
        assert windows[1]["closes_at"] > dt.datetime.now(UTC)  # the next Monday 08:00 in Paris

        sink = tmp_path / "outbox.jsonl"
        settings = settings_for(
            empty_dsn, email_providers="file", file_sink_path=str(sink), jobs=False
        )
        async with running(settings) as service:
            (sent,) = await wait_rows(conn, [windows[0]["notification_id"]], {"sent"}, service)
        rows = await conn.fetch(
            "SELECT status, digest_id FROM pgnotify.notifications WHERE id = ANY($1)",
            [*old, newer],
        )
        assert {tuple(r) for r in rows} == {("digested", sent["id"])}
        assert (
            await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", recent)
            == "held"
        )
        (mail,) = [json.loads(line) for line in sink.read_text().splitlines()]
        assert mail["subject"] == "Your 3 updates"
        assert mail["text"] == "- newer\n- Facture 1\n- Facture 2\n"  # in order of creation
    finally:
        await conn.close()
