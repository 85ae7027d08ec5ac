"""Schema 0019: throttles per recipient, category and channel, counted in the database at send
time so every replica agrees; the extra is dropped, delayed to the next window, or folded into
a batch that goes out when the next window opens."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.worker import running

TAKE = "SELECT * FROM pgnotify.take_throttle($1, 'promo', 'push', $2)"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def test_take_throttle_counts_per_window_exactly_at_the_edge(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 2, interval '1 day', 'drop')")
    midnight = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    last = midnight - dt.timedelta(microseconds=1)
    first, second, third = [await conn.fetchrow(TAKE, "ada", last) for _ in range(3)]
    assert [(r["allowed"], r["used"]) for r in (first, second, third)] == [
        (True, 1),
        (True, 2),
        (False, 2),
    ]
    assert (first["window_start"], first["window_end"]) == (
        midnight - dt.timedelta(days=1),
        midnight,
    )
    # the edge itself opens the next window (and forgets the old one)
    edge = await conn.fetchrow(TAKE, "ada", midnight)
    assert (edge["allowed"], edge["used"], edge["window_start"]) == (True, 1, midnight)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.throttle_counts") == 1
    # other recipients and channels have their own allowance
    assert (await conn.fetchrow(TAKE, "bob", last))["allowed"] is True
    other = await conn.fetchrow(
        "SELECT * FROM pgnotify.take_throttle('ada', 'promo', 'email', $1)", last
    )
    assert other["allowed"] is True
    # a category without a throttle is always allowed and counts nothing
    free = await conn.fetchrow("SELECT * FROM pgnotify.take_throttle('ada', 'news', 'push')")
    assert (free["allowed"], free["max_sends"]) == (True, None)


async def test_windows_are_fixed_from_the_epoch_in_whole_seconds(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 1, interval '7 minutes', 'drop')")
    at = dt.datetime(2026, 11, 28, 5, 41, 30, tzinfo=dt.UTC)
    row = await conn.fetchrow(TAKE, "ada", at)
    start = (at - EPOCH).total_seconds() // 420 * 420
    assert row["window_start"] == EPOCH + dt.timedelta(seconds=start)
    assert row["window_end"] - row["window_start"] == dt.timedelta(minutes=7)
    with pytest.raises(asyncpg.PostgresError, match="whole seconds"):
        await conn.execute("SELECT pgnotify.set_throttle('promo', 1, interval '1.5 seconds')")
    with pytest.raises(asyncpg.PostgresError, match="unknown throttle action"):
        await conn.execute("SELECT pgnotify.set_throttle('promo', 1, interval '1 hour', 'x')")


async def test_concurrent_takes_never_exceed_the_limit(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 7, interval '1 hour', 'drop')")
    others = [await asyncpg.connect(dsn) for _ in range(8)]
    try:

        async def takes(c: asyncpg.Connection) -> list[bool]:
            return [
                await c.fetchval(f"SELECT allowed FROM ({TAKE}) t", "ada", None) for _ in range(4)
            ]

        results = [r for rs in await asyncio.gather(*(takes(c) for c in others)) for r in rs]
    finally:
        for c in others:
            await c.close()
    assert results.count(True) == 7 and len(results) == 32


async def send_four(conn: asyncpg.Connection) -> list[int]:
    return [
        await conn.fetchval(
            "SELECT pgnotify.enqueue('inapp', user_id => 'ada', category => 'promo', body => $1)",
            f"offer {n}",
        )
        for n in range(4)
    ]


async def test_drop_skips_the_extra_with_the_reason_in_its_events(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 2, interval '1 day', 'drop')")
    ids = await send_four(conn)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, ids, {"sent", "skipped"}, service)
    assert sorted(r["status"] for r in rows) == ["sent", "sent", "skipped", "skipped"]
    events = await conn.fetch(
        "SELECT error_code, error FROM pgnotify.events WHERE event = 'skipped' ORDER BY id"
    )
    assert [e["error_code"] for e in events] == ["throttled", "throttled"]
    assert events[0]["error"] == "the category allows 2 per 1 day to this recipient: dropped"
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox") == 2


async def test_delay_moves_the_extra_to_the_next_window(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 2, interval '1 hour', 'delay')")
    ids = await send_four(conn)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, ids, {"sent", "scheduled"}, service)
    delayed = [r for r in rows if r["status"] == "scheduled"]
    assert len(delayed) == 2
    next_window = await conn.fetchval(
        "SELECT to_timestamp((floor(extract(epoch FROM now()) / 3600) + 1) * 3600)"
    )
    for row in delayed:
        assert abs((row["run_at"] - next_window).total_seconds()) < 2
        assert row["attempts"] == 0  # waiting for the next window spends no attempt
    codes = await conn.fetch("SELECT error_code FROM pgnotify.events WHERE event = 'deferred'")
    assert [c["error_code"] for c in codes] == ["throttled", "throttled"]


async def test_batch_folds_the_extra_into_one_notification_for_the_next_window(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 2, interval '1 hour', 'batch')")
    ids = await send_four(conn)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, ids, {"sent", "held"}, service)
    held = [r for r in rows if r["status"] == "held"]
    assert len(held) == 2 and {r["hold"] for r in held} == {"batch"}
    assert len({r["batch_id"] for r in held}) == 1
    batch = await conn.fetchrow("SELECT * FROM pgnotify.batches")
    assert (batch["reason"], batch["items"]) == ("throttle", 2)
    next_window = await conn.fetchval(
        "SELECT to_timestamp((floor(extract(epoch FROM now()) / 3600) + 1) * 3600)"
    )
    assert batch["closes_at"] == next_window
    sender = await conn.fetchrow(
        "SELECT status, run_at FROM pgnotify.notifications WHERE id = $1", batch["notification_id"]
    )
    assert (sender["status"], sender["run_at"]) == ("scheduled", next_window)
    # when it comes due it carries both folded items
    payload = await conn.fetchval(
        "UPDATE pgnotify.notifications SET status = 'queued' WHERE id = $1 RETURNING payload",
        batch["notification_id"],
    )
    assert [i["id"] for i in payload["items"]] == sorted(r["id"] for r in held)
    assert payload["count"] == 2 and payload["batch_key"] is None
