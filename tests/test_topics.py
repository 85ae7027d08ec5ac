"""Schema 0019: topics. notify_topic() fans one notification out to every subscriber in the
producer's transaction; each row then takes the normal send-time path (preferences,
suppressions, unsubscribes, quiet hours, throttles). Idempotent per key and subscriber."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.worker import running

NOTIFY = (
    "SELECT pgnotify.notify_topic('proj-1', 'updates', subject => 'Update', "
    "body => 'Hello {{ who }}', payload => '{\"who\": \"team\"}', channels => '{email,inapp}', "
    "idempotency_key => $1)"
)


async def people(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        SELECT pgnotify.create_topic('proj-1', 'Project 1 followers');
        INSERT INTO pgnotify.contacts (user_id, email) VALUES
            ('ada', 'ada@example.com'), ('bob', 'bob@example.com'), ('cat', 'cat@example.com'),
            ('dan', 'dan@example.com'), ('eve', 'eve@example.com'), ('fay', 'fay@example.com');
        UPDATE pgnotify.contacts SET unsubscribed_at = now() WHERE user_id = 'cat';
        UPDATE pgnotify.contacts SET quiet_start = (now() - interval '1 hour')::time,
                                     quiet_end = (now() + interval '1 hour')::time
        WHERE user_id = 'eve';
        INSERT INTO pgnotify.suppressions (channel, address, reason, source)
        VALUES ('email', 'dan@example.com', 'hard_bounce', 'test');
        SELECT pgnotify.set_preference('bob', 'off', 'inapp', 'updates');
        SELECT pgnotify.subscribe('proj-1', u) FROM unnest('{ada,bob,cat,dan,eve,fay}'::text[]) u;
        SELECT pgnotify.unsubscribe('proj-1', 'fay');
        """
    )


async def test_a_fan_out_honours_each_subscribers_preferences_and_suppressions(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await people(conn)
    made = await conn.fetchval(NOTIFY, "launch-1")
    assert made == 9  # 5 subscribers x (email, inapp), minus bob's in-app (turned off)
    rows = await conn.fetch("SELECT id FROM pgnotify.notifications")
    async with running(worker_settings(email_providers="console")) as service:
        done = await wait_rows(
            conn, [r["id"] for r in rows], {"sent", "skipped", "scheduled"}, service
        )
    got = {(r["user_id"], r["channel"]): (r["status"], r["last_error"]) for r in done}
    assert {k: v[0] for k, v in got.items()} == {
        ("ada", "email"): "sent",
        ("ada", "inapp"): "sent",
        ("bob", "email"): "sent",
        ("cat", "email"): "skipped",  # unsubscribed from everything
        ("cat", "inapp"): "skipped",
        ("dan", "email"): "skipped",  # suppressed address
        ("dan", "inapp"): "sent",
        ("eve", "email"): "scheduled",  # quiet hours: deferred to their end
        ("eve", "inapp"): "scheduled",
    }
    assert "suppression" in got[("dan", "email")][1]
    inbox = await conn.fetch("SELECT user_id, body FROM pgnotify.inbox ORDER BY user_id")
    assert [(m["user_id"], m["body"]) for m in inbox] == [
        ("ada", "Hello team"),
        ("dan", "Hello team"),
    ]
    # fay unsubscribed: nothing at all for her
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.notifications WHERE user_id = 'fay'")
        == 0
    )


async def test_a_topic_fan_out_is_throttled_per_subscriber(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await people(conn)
    await conn.execute("SELECT pgnotify.set_throttle('updates', 1, interval '1 day', 'drop')")
    await conn.fetchval(NOTIFY, "launch-1")
    await conn.fetchval(NOTIFY, "launch-2")
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM pgnotify.notifications WHERE user_id = 'ada' AND channel = 'inapp'"
        )
    ]
    async with running(worker_settings(email_providers="console")) as service:
        done = await wait_rows(conn, ids, {"sent", "skipped"}, service)
    assert sorted((r["status"], r["last_error"] is not None) for r in done) == [
        ("sent", False),
        ("skipped", True),
    ]


async def test_the_same_key_reaches_each_subscriber_once(conn: asyncpg.Connection) -> None:
    await people(conn)
    assert await conn.fetchval(NOTIFY, "launch-1") == 9
    assert await conn.fetchval(NOTIFY, "launch-1") == 0  # a retried call adds nothing
    await conn.execute("SELECT pgnotify.subscribe('proj-1', 'fay')")
    assert await conn.fetchval(NOTIFY, "launch-1") == 2  # only the new subscriber's rows
    keys = await conn.fetch(
        "SELECT idempotency_key FROM pgnotify.notifications WHERE user_id = 'fay' ORDER BY 1"
    )
    assert [k["idempotency_key"] for k in keys] == ["launch-1:email:fay", "launch-1:inapp:fay"]
    # a long user id keeps the key within its 255 characters
    long_user = "u" * 200
    await conn.execute("SELECT pgnotify.subscribe('proj-1', $1)", long_user)
    assert await conn.fetchval(NOTIFY, "launch-1") == 1
    assert await conn.fetchval(NOTIFY, "launch-1") == 0


async def test_clear_errors_for_unknown_topics_and_bad_calls(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.PostgresError, match="unknown topic 'nope'") as caught:
        await conn.execute("SELECT pgnotify.subscribe('nope', 'ada')")
    assert "create_topic" in (caught.value.hint or "")
    with pytest.raises(asyncpg.PostgresError, match="unknown topic 'nope'"):
        await conn.execute("SELECT pgnotify.notify_topic('nope', 'news', body => 'x')")
    await conn.execute("SELECT pgnotify.create_topic('t')")
    with pytest.raises(asyncpg.PostgresError, match="unknown template 'missing'"):
        await conn.execute("SELECT pgnotify.notify_topic('t', 'news', 'missing')")
    with pytest.raises(asyncpg.PostgresError, match="unknown channel 'fax'"):
        await conn.execute(
            "SELECT pgnotify.notify_topic('t', 'news', body => 'x', channels => '{fax}')"
        )
    with pytest.raises(asyncpg.PostgresError, match="1 to 120 characters"):
        await conn.execute(
            "SELECT pgnotify.notify_topic('t', 'news', body => 'x', idempotency_key => $1)",
            "k" * 121,
        )
    # nobody subscribed: nothing to do, not an error
    assert await conn.fetchval("SELECT pgnotify.notify_topic('t', 'news', body => 'x')") == 0
    assert await conn.fetchval("SELECT pgnotify.subscribe('t', 'ada')") is True
    assert await conn.fetchval("SELECT pgnotify.subscribe('t', 'ada')") is False
    assert await conn.fetchval("SELECT pgnotify.unsubscribe('t', 'zed')") is False


async def test_a_topic_fan_out_with_a_batch_key_joins_each_subscribers_window(
    conn: asyncpg.Connection,
) -> None:
    await people(conn)
    await conn.execute("SELECT pgnotify.set_batching('updates', interval '15 minutes')")
    for n in range(3):
        await conn.execute(
            "SELECT pgnotify.notify_topic('proj-1', 'updates', body => 'x', "
            "channels => '{inapp}', batch_key => 'proj-1', payload => jsonb_build_object('n', $1::int))",
            n,
        )
    windows = await conn.fetch("SELECT recipient, items FROM pgnotify.batches ORDER BY recipient")
    assert [(w["recipient"], w["items"]) for w in windows] == [
        ("ada", 3),
        ("cat", 3),
        ("dan", 3),
        ("eve", 3),
    ]  # bob turned in-app off for updates
