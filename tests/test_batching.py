"""Schema 0019: batching windows. Rows inserted with a batch_key into a category with a
batch_window gather per (channel, recipient, category, key): the first opens the window, the
rest join it, and one notification goes out when it ends with the items as template data."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.worker import running

INSERT = (
    "INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, subject, body, "
    "payload, batch_key) VALUES ('inapp', $1, $1, 'thread', $2, $3, $4::text::jsonb, $5)"
)
SUBJECT = "{{ count }} new in {{ batch_key }}"
BODY = "{% for i in items %}{{ i.payload.text }};{% endfor %}{% if more %} +{{ more }}{% endif %}"


async def item(
    conn: asyncpg.Connection, user: str, key: str, text: str, *, body: str = BODY
) -> None:
    await conn.execute(INSERT, user, SUBJECT, body, json.dumps({"text": text}), key)


async def test_many_concurrent_producers_make_exactly_one_window_per_key(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '5 minutes', 3)")
    producers = [await asyncpg.connect(dsn) for _ in range(12)]
    start = asyncio.Event()

    async def produce(c: asyncpg.Connection, p: int) -> None:
        await start.wait()
        for i in range(15):
            async with c.transaction():  # several items per transaction, keys interleaved
                await item(c, "ada", "t1", f"{p}-{i}")
                await item(c, "ada", "t2", f"{p}-{i}")
                await item(c, "bob", "t1", f"{p}-{i}")

    try:
        tasks = [asyncio.create_task(produce(c, p)) for p, c in enumerate(producers)]
        start.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    finally:
        for c in producers:
            await c.close()

    batches = await conn.fetch(
        "SELECT recipient, batch_key, items, notification_id, closes_at - opened_at AS span "
        "FROM pgnotify.batches ORDER BY recipient, batch_key"
    )
    assert [(b["recipient"], b["batch_key"], b["items"]) for b in batches] == [
        ("ada", "t1", 180),
        ("ada", "t2", 180),
        ("bob", "t1", 180),
    ]
    assert all(b["span"] == dt.timedelta(minutes=5) for b in batches)
    senders = await conn.fetch(
        "SELECT id, status, batch_of FROM pgnotify.notifications WHERE batch_of IS NOT NULL"
    )
    assert len(senders) == 3 and {s["status"] for s in senders} == {"scheduled"}
    assert {s["id"] for s in senders} == {b["notification_id"] for b in batches}
    held = await conn.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT batch_id) AS windows FROM pgnotify.notifications "
        "WHERE status = 'held' AND hold = 'batch'"
    )
    assert (held["n"], held["windows"]) == (540, 3)

    # the windows come due: each becomes one notification carrying its items
    await conn.execute(
        "UPDATE pgnotify.notifications SET run_at = now() WHERE batch_of IS NOT NULL"
    )
    promoted = await conn.fetch(
        "UPDATE pgnotify.notifications SET status = 'queued' WHERE batch_of IS NOT NULL "
        "RETURNING payload"
    )
    for row in promoted:
        payload = row["payload"]
        assert (payload["count"], payload["more"], len(payload["items"])) == (180, 177, 3)
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.notifications WHERE status = 'digested'")
        == 540
    )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.batches WHERE closed_at IS NULL") == 0


async def test_the_window_goes_out_on_time_as_one_message_with_its_items(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '2 seconds', 2)")
    async with running(worker_settings(poll_interval=0.2)) as service:
        for text in ("one", "two", "three"):
            await item(conn, "ada", "doc-7", text)
        batch = await conn.fetchrow("SELECT * FROM pgnotify.batches")
        assert batch["closes_at"] - batch["opened_at"] == dt.timedelta(seconds=2)
        rows = await wait_rows(conn, [batch["notification_id"]], {"sent"}, service, timeout=10)
    sent_at = rows[0]["sent_at"]
    # closes on time: not before the window ends, and within the scheduler's poll after it
    assert batch["closes_at"] <= sent_at < batch["closes_at"] + dt.timedelta(seconds=1.5)
    inbox = await conn.fetch("SELECT title, body FROM pgnotify.inbox")
    assert [(m["title"], m["body"]) for m in inbox] == [("3 new in doc-7", "one;two; +1")]
    items = await conn.fetch(
        "SELECT status, digest_id FROM pgnotify.notifications WHERE batch_id = $1", batch["id"]
    )
    assert {(i["status"], i["digest_id"]) for i in items} == {
        ("digested", batch["notification_id"])
    }
    events = await conn.fetch(
        "SELECT e.event FROM pgnotify.events e JOIN pgnotify.notifications n "
        "ON n.id = e.notification_id WHERE n.batch_id = $1 ORDER BY e.id",
        batch["id"],
    )
    assert [e["event"] for e in events] == ["batched"] * 3 + ["digested"] * 3


async def test_an_item_after_the_window_closed_opens_the_next_one(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '1 minute')")
    await item(conn, "ada", "t", "before")
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'queued' WHERE batch_of IS NOT NULL"
    )
    await item(conn, "ada", "t", "after")
    windows = await conn.fetch("SELECT items, closed_at FROM pgnotify.batches ORDER BY id")
    assert [(w["items"], w["closed_at"] is None) for w in windows] == [(1, False), (1, True)]


async def test_a_producer_still_joining_holds_the_close_back_and_is_not_lost(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '1 minute')")
    await item(conn, "ada", "t", "first")
    late = await asyncpg.connect(dsn)
    try:
        tx = late.transaction()
        await tx.start()
        await item(late, "ada", "t", "joining")  # holds the window's row until it commits
        # the close does not wait on the producer: the notification stays scheduled a second
        status = await conn.fetchval(
            "UPDATE pgnotify.notifications SET status = 'queued', run_at = now() "
            "WHERE batch_of IS NOT NULL RETURNING status"
        )
        assert status == "scheduled"
        await tx.commit()
    finally:
        await late.close()
    payload = await conn.fetchval(
        "UPDATE pgnotify.notifications SET status = 'queued' WHERE batch_of IS NOT NULL "
        "RETURNING payload"
    )
    assert [i["payload"]["text"] for i in payload["items"]] == ["first", "joining"]


async def test_cancelling_the_windows_notification_cancels_its_items(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '1 minute')")
    await item(conn, "ada", "t", "a")
    await item(conn, "ada", "t", "b")
    sender = await conn.fetchval("SELECT notification_id FROM pgnotify.batches")
    assert await conn.fetchval("SELECT pgnotify.cancel($1)", sender) is True
    statuses = await conn.fetch(
        "SELECT status FROM pgnotify.notifications WHERE batch_id IS NOT NULL"
    )
    assert [s["status"] for s in statuses] == ["cancelled", "cancelled"]
    await item(conn, "ada", "t", "c")  # a new window, not the cancelled one
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.batches") == 2


async def test_a_batch_key_needs_a_batching_category_and_a_sane_key(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.PostgresError, match="has no batching window") as caught:
        await item(conn, "ada", "t", "x")
    assert "set_batching" in (caught.value.hint or "")
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '1 minute')")
    with pytest.raises(asyncpg.PostgresError, match="batch_key must be 1 to 255"):
        await item(conn, "ada", " ", "x")
    with pytest.raises(asyncpg.PostgresError, match="between 1 second and 7 days"):
        await conn.execute("SELECT pgnotify.set_batching('thread', interval '8 days')")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0
