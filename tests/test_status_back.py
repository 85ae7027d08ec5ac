"""Status back to the app (schema 0018): NOTIFY pgnotify_status on every status change and provider
report, signed status webhooks delivered like any webhook (retried, never looping), and
pgnotify.wait_for()."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.roles import LoginAs
from tests.support.webhooks import WEBHOOK_SECRET, Received, WebhookSink
from tests.support.worker import running, settings_for

DONE = {"sent", "failed", "dead"}
PAYLOAD_KEYS = {"id", "event", "status", "channel", "category", "user_id"}


class Statuses:
    """The payloads of NOTIFY pgnotify_status seen on a LISTEN connection of its own."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def on(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.seen.append(json.loads(payload))
        self.changed.set()

    def of(self, nid: int) -> list[str]:
        return [p["event"] for p in self.seen if p["id"] == nid]

    async def until(self, nid: int, events: list[str], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.of(nid) != events:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def statuses(dsn: str) -> AsyncIterator[Statuses]:
    listener = await asyncpg.connect(dsn)
    got = Statuses()
    await listener.add_listener("pgnotify_status", got.on)
    yield got
    await listener.close()


async def enqueue_webhook(conn: asyncpg.Connection, url: str, **kw: Any) -> int:
    nid: int = await conn.fetchval(
        "INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, payload, "
        "max_attempts) VALUES ('webhook', $1, $2, $3, '{}', $4) RETURNING id",
        url,
        kw.get("user_id", "u-1"),
        kw.get("category", "orders"),
        kw.get("max_attempts", 5),
    )
    return nid


# --- NOTIFY pgnotify_status ------------------------------------------------------------------------


async def test_every_transition_of_a_delivery_is_notified_with_the_stable_payload(
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
    statuses: Statuses,
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(status=503 if n == 1 else 200)
    nid = await enqueue_webhook(conn, webhook_sink.url + "/orders")
    async with running(worker_settings()) as service:
        await wait_rows(conn, [nid], DONE, service)
        await statuses.until(nid, ["processing", "scheduled", "queued", "processing", "sent"])
    last = [p for p in statuses.seen if p["id"] == nid][-1]
    assert last == {
        "id": nid,
        "event": "sent",
        "status": "sent",
        "channel": "webhook",
        "category": "orders",
        "user_id": "u-1",
    }
    for payload in statuses.seen:
        assert set(payload) == PAYLOAD_KEYS
        assert "127.0.0.1" not in json.dumps(payload)  # never the recipient address


@pytest.mark.parametrize(
    ("change", "event"),
    [
        ("UPDATE pgnotify.notifications SET status = 'failed' WHERE id = $1", "failed"),
        ("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", "dead"),
        ("SELECT pgnotify.cancel($1)", "cancelled"),
        ("UPDATE pgnotify.notifications SET status = 'skipped' WHERE id = $1", "skipped"),
        ("UPDATE pgnotify.notifications SET status = 'expired' WHERE id = $1", "expired"),
    ],
)
async def test_each_final_status_is_notified(
    conn: asyncpg.Connection, statuses: Statuses, change: str, event: str
) -> None:
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    await conn.execute(change, nid)
    await statuses.until(nid, [event])
    (payload,) = [p for p in statuses.seen if p["id"] == nid]
    assert payload == {
        "id": nid,
        "event": event,
        "status": event,
        "channel": "webhook",
        "category": "orders",
        "user_id": "u-1",
    }


async def test_an_update_that_keeps_the_status_notifies_nothing(
    conn: asyncpg.Connection, statuses: Statuses
) -> None:
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    await conn.execute("UPDATE pgnotify.notifications SET priority = 3 WHERE id = $1", nid)
    await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", nid)
    await statuses.until(nid, ["dead"])  # the priority change said nothing before it


async def test_one_statement_announces_each_row_whose_status_it_changed(
    conn: asyncpg.Connection, statuses: Statuses
) -> None:
    # the announcement is made once per statement (schema 0023) but still names every row
    ids = [await enqueue_webhook(conn, "https://hooks.example.com/x") for _ in range(3)]
    await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", ids[0])
    await statuses.until(ids[0], ["dead"])
    await conn.execute(  # ids[0] is already dead: its status does not change, so no NOTIFY
        "UPDATE pgnotify.notifications SET status = 'dead', priority = 2 WHERE id = ANY($1)", ids
    )
    await statuses.until(ids[2], ["dead"])
    await statuses.until(ids[1], ["dead"])
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'cancelled' WHERE id = $1", ids[0]
    )
    await statuses.until(ids[0], ["dead", "cancelled"])  # nothing came between for ids[0]
    assert statuses.of(ids[1]) == ["dead"] and statuses.of(ids[2]) == ["dead"]


async def test_a_provider_report_is_notified_with_the_rows_status(
    conn: asyncpg.Connection, statuses: Statuses
) -> None:
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    await conn.execute("UPDATE pgnotify.notifications SET status = 'sent' WHERE id = $1", nid)
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, provider, external_id) "
        "VALUES ($1, 'opened', 'resend', 'evt_1')",
        nid,
    )
    await conn.execute(  # an ordinary event (no external id) is not a report
        "INSERT INTO pgnotify.events (notification_id, event) VALUES ($1, 'note')", nid
    )
    await statuses.until(nid, ["sent", "opened"])
    assert [p for p in statuses.seen if p["id"] == nid][-1]["status"] == "sent"


async def test_the_payload_stays_far_under_notifys_limit(
    conn: asyncpg.Connection, statuses: Statuses
) -> None:
    # the longest user_id and category validation allows, each character escaped by JSON
    user, category = "\x01" * 256, "\u2603" * 100
    nid = await enqueue_webhook(
        conn, "https://hooks.example.com/x", user_id=user, category=category
    )
    await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", nid)
    await statuses.until(nid, ["dead"])
    (payload,) = [p for p in statuses.seen if p["id"] == nid]
    assert (payload["user_id"], payload["category"]) == (user, category)
    assert len(json.dumps(payload).encode()) < 2500  # NOTIFY refuses 8000 bytes and more


# --- pgnotify.status_notify (schema 0027) ----------------------------------------------------------


async def announce_sentinel(dsn: str, statuses: Statuses) -> int:
    """A status change made with the setting on, and heard: a listener gets notifications in
    commit order, so whatever was committed before it and announced has been heard by then."""
    c = await asyncpg.connect(dsn)
    try:
        await c.execute("SET pgnotify.status_notify = on")
        nid = await enqueue_webhook(c, "https://hooks.example.com/sentinel", category="sentinel")
        await c.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", nid)
    finally:
        await c.close()
    await statuses.until(nid, ["dead"])
    return nid


@pytest.mark.parametrize("setting", [None, "off"])
async def test_the_database_setting_silences_the_worker_and_provider_reports_not_status_webhooks(
    dsn: str,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
    statuses: Statuses,
    setting: str | None,
) -> None:
    if setting is not None:  # as docs/app-apis.md says; the worker's sessions start after it
        database = dsn.rsplit("/", 1)[1]
        await conn.execute(f'ALTER DATABASE "{database}" SET pgnotify.status_notify = {setting}')
    await conn.execute(
        "INSERT INTO pgnotify.status_webhooks (url, category, events) "
        "VALUES ($1, 'orders', '{sent,delivered}')",
        webhook_sink.url + "/status",
    )
    nid = await enqueue_webhook(conn, webhook_sink.url + "/orders")
    async with running(worker_settings()) as service:
        await wait_rows(conn, [nid], {"sent"}, service)
        shown = (await service.status())["status_notify"]
        reporter = await asyncpg.connect(dsn)  # a provider report, in a session of the database
        try:
            await reporter.execute(
                "INSERT INTO pgnotify.events (notification_id, event, provider, external_id) "
                "VALUES ($1, 'delivered', 'resend', 'evt_1')",
                nid,
            )
        finally:
            await reporter.close()
        hooks = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM pgnotify.notifications WHERE category = 'pgnotify_status'"
            )
        ]
        assert len(hooks) == 2  # sent and delivered, whatever the setting
        await wait_rows(conn, hooks, {"sent"}, service)
    sentinel = await announce_sentinel(dsn, statuses)
    bodies = [
        Webhook(WEBHOOK_SECRET).verify(r.body, r.headers) for r in at("/status", webhook_sink)
    ]
    assert sorted(b["type"] for b in bodies) == ["notification.delivered", "notification.sent"]
    if setting is None:  # unchanged: the worker's claim and complete, and the report, announced
        assert shown == {"setting": None, "enabled": True}
        assert statuses.of(nid) == ["processing", "sent", "delivered"]
        assert {p["id"] for p in statuses.seen} == {nid, sentinel, *hooks}
    else:  # nothing at all before the sentinel: not the row, the report or the status webhooks
        assert shown == {"setting": "off", "enabled": False}
        assert [p["id"] for p in statuses.seen] == [sentinel]


@pytest.mark.parametrize(
    ("value", "announced"),
    [
        ("off", False),
        ("OFF", False),
        (" false ", False),
        ("no", False),
        ("0", False),
        ("on", True),
        ("true", True),
        ("maybe", True),  # unknown: on, and the UPDATE still works
        ("", True),
    ],
)
async def test_a_session_setting_decides_for_that_sessions_changes(
    dsn: str, conn: asyncpg.Connection, statuses: Statuses, value: str, announced: bool
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.status_webhooks (url, category, events) "
        "VALUES ('https://hooks.example.com/s', 'orders', '{dead,opened}')"
    )
    await conn.execute(f"SET pgnotify.status_notify = '{value}'")
    assert await conn.fetchval("SELECT pgnotify.status_notify_enabled()") is announced
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", nid)
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, provider, external_id) "
        "VALUES ($1, 'opened', 'resend', 'evt_1')",
        nid,
    )
    await announce_sentinel(dsn, statuses)
    assert statuses.of(nid) == (["dead", "opened"] if announced else [])
    # the status webhooks do not depend on it: one for the change, one for the report
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE category = 'pgnotify_status'"
        )
        == 2
    )


# --- status webhooks ---------------------------------------------------------------------------------


@pytest.fixture(params=["owner", "pgnotify_worker"])
async def any_worker(
    request: pytest.FixtureRequest, dsn: str, login_as: LoginAs
) -> Callable[..., Settings]:
    """As the schema owner, and as a login role holding only pgnotify_worker."""
    if request.param == "owner":
        return lambda **overrides: settings_for(dsn, **overrides)
    url = await login_as("pgnotify_worker")
    return lambda **overrides: settings_for(url, **{"migrate_on_start": False, **overrides})


def at(path: str, sink: WebhookSink) -> list[Received]:
    return [r for r in sink.requests if r.path == path]


async def test_a_status_webhook_is_signed_retried_on_503_and_never_loops(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, any_worker: Callable[..., Settings]
) -> None:
    def answer(received: Received, seen: int) -> web.Response:
        return web.Response(status=503 if received.path == "/status" and seen == 1 else 200)

    webhook_sink.responder = answer
    await conn.execute(
        "INSERT INTO pgnotify.status_webhooks (url, category, events) VALUES ($1, 'orders', $2)",
        webhook_sink.url + "/status",
        ["sent", "failed", "dead"],
    )
    nid = await enqueue_webhook(conn, webhook_sink.url + "/orders")
    other = await enqueue_webhook(conn, webhook_sink.url + "/orders", category="chat")
    async with running(any_worker()) as service:
        await wait_rows(conn, [nid, other], DONE, service)
        hook_ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM pgnotify.notifications WHERE category = 'pgnotify_status'"
            )
        ]
        assert len(hook_ids) == 1  # one for the orders row; none for chat (another category)
        (hook,) = await wait_rows(conn, hook_ids, DONE, service)
    assert (hook["status"], hook["attempts"]) == ("sent", 2)  # 503, then retried like any webhook
    first, second = at("/status", webhook_sink)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    body = Webhook(WEBHOOK_SECRET).verify(second.body, second.headers)
    assert body["type"] == "notification.sent"
    assert body["data"] == {
        "id": nid,
        "event": "sent",
        "status": "sent",
        "channel": "webhook",
        "category": "orders",
        "user_id": "u-1",
    }
    assert second.headers["Content-Type"] == "application/json"
    # no loop: the status webhook's own processing/scheduled/sent produced no further one
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE category = 'pgnotify_status'"
        )
        == 1
    )


async def test_a_global_status_webhook_gets_provider_reports_and_template_syntax_is_inert(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.status_webhooks (url, events) VALUES ($1, '{delivered,opened}')",
        webhook_sink.url + "/status",
    )
    nid = await enqueue_webhook(
        conn, "https://hooks.example.com/x", user_id="{{ 7 * 7 }}{% x %}{#", category="news"
    )
    await conn.execute("UPDATE pgnotify.notifications SET status = 'sent' WHERE id = $1", nid)
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, provider, external_id) "
        "VALUES ($1, 'delivered', 'resend', 'e1'), ($1, 'opened', 'resend', 'e2')",
        nid,
    )
    async with running(worker_settings()) as service:
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM pgnotify.notifications WHERE category = 'pgnotify_status'"
            )
        ]
        assert len(ids) == 2  # 'sent' was not asked for
        await wait_rows(conn, ids, {"sent"}, service)
    bodies = [Webhook(WEBHOOK_SECRET).verify(r.body, r.headers) for r in webhook_sink.requests]
    assert sorted(b["type"] for b in bodies) == ["notification.delivered", "notification.opened"]
    assert {b["data"]["user_id"] for b in bodies} == {"{{ 7 * 7 }}{% x %}{#"}


@pytest.mark.parametrize(
    ("url", "events", "field", "words"),
    [
        ("http://169.254.169.254/latest", ["sent"], "url", "cloud metadata"),
        ("http://10.0.0.5/hook", ["sent"], "url", "private"),
        ("https://user:pw@hooks.example.com/", ["sent"], "url", "not an http(s) URL"),
        ("ftp://hooks.example.com/", ["sent"], "url", "not an http(s) URL"),
        ("https://hooks.example.com/", ["sent", "exploded"], "events", "exploded"),
        ("https://hooks.example.com/", [], "events", "at least one event"),
    ],
)
async def test_a_bad_status_webhook_is_refused_at_insert(
    conn: asyncpg.Connection, url: str, events: list[str], field: str, words: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute(
            "INSERT INTO pgnotify.status_webhooks (url, events) VALUES ($1, $2)", url, events
        )
    assert caught.value.column_name == field
    assert words in caught.value.message


async def test_a_status_webhook_cannot_watch_its_own_category(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="loop"):
        await conn.execute(
            "INSERT INTO pgnotify.status_webhooks (url, category) "
            "VALUES ('https://hooks.example.com/', 'pgnotify_status')"
        )


# --- wait_for ---------------------------------------------------------------------------------------


async def test_wait_for_returns_when_the_row_is_final(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    nid = await enqueue_webhook(conn, webhook_sink.url + "/orders")
    waiting = asyncio.create_task(conn.fetchval("SELECT pgnotify.wait_for($1, 20)", nid))
    await asyncio.sleep(0)  # the call is on its way before the worker starts
    started = time.monotonic()
    async with running(worker_settings()):
        status = await asyncio.wait_for(waiting, 20)
    assert status == "sent"
    assert time.monotonic() - started < 15


async def test_wait_for_returns_the_current_status_at_the_timeout(
    conn: asyncpg.Connection,
) -> None:
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")  # no worker: stays queued
    started = time.monotonic()
    assert await conn.fetchval("SELECT pgnotify.wait_for($1, 0.3)", nid) == "queued"
    assert 0.25 <= time.monotonic() - started < 3


async def test_wait_for_does_not_block_a_writer(conn: asyncpg.Connection, dsn: str) -> None:
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    other = await asyncpg.connect(dsn)
    try:
        waiting = asyncio.create_task(conn.fetchval("SELECT pgnotify.wait_for($1, 10)", nid))
        await asyncio.sleep(0.1)
        async with asyncio.timeout(2):  # a claim-like write goes through while it waits
            await other.execute(
                "UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", nid
            )
        assert await asyncio.wait_for(waiting, 5) == "dead"
    finally:
        await other.close()


async def test_wait_for_says_what_is_wrong(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.NoDataFoundError, match="no notification 424242"):
        await conn.fetchval("SELECT pgnotify.wait_for(424242, 1)")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="between 0 and 3600"):
        await conn.fetchval("SELECT pgnotify.wait_for(1, -1)")
    nid = await enqueue_webhook(conn, "https://hooks.example.com/x")
    async with conn.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.InvalidTransactionStateError, match="READ COMMITTED"):
            await conn.fetchval("SELECT pgnotify.wait_for($1, 1)", nid)
