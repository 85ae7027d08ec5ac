"""Delivery end to end: a worker in this process, a real database, a fake webhook receiver."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from pgnotify_worker.config import Settings
from pgnotify_worker.service import Service
from tests.support.db import wait_rows
from tests.support.roles import LoginAs
from tests.support.webhooks import WEBHOOK_SECRET, Received, WebhookSink
from tests.support.worker import running, settings_for

DONE = {"sent", "failed", "dead"}


@pytest.fixture(params=["owner", "pgnotify_worker"])
async def worker_settings(
    request: pytest.FixtureRequest, dsn: str, login_as: LoginAs
) -> Callable[..., Settings]:
    """Each delivery test runs twice: as the schema owner, and as a login role that holds only
    pgnotify_worker (no superuser, no DDL, migrations left to the owner): least privilege is
    enough for everything the worker does."""
    if request.param == "owner":
        return lambda **overrides: settings_for(dsn, **overrides)
    url = await login_as("pgnotify_worker")
    return lambda **overrides: settings_for(url, **{"migrate_on_start": False, **overrides})


async def enqueue_webhook(conn: asyncpg.Connection, url: str, **kw: object) -> int:
    args = ", ".join(f"{k} => ${i + 2}" for i, k in enumerate(kw))
    nid: int = await conn.fetchval(
        f"SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1{', ' + args if args else ''})",
        url,
        *kw.values(),
    )
    return nid


async def events_of(conn: asyncpg.Connection, nid: int) -> list[str]:
    """The notification's steps after 'queued', as `show` and processing_timeline tell them."""
    rows = await conn.fetch(
        "SELECT event FROM pgnotify.processing_timeline WHERE notification_id = $1 "
        "AND event <> 'queued' ORDER BY at, seq",
        nid,
    )
    return [r["event"] for r in rows]


# --- the happy path -------------------------------------------------------------------------------


async def test_webhook_is_delivered_signed_and_recorded(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    nid = await enqueue_webhook(
        conn, webhook_sink.url + "/hooks/orders", payload={"order": 7}, category="order.shipped"
    )
    async with running(worker_settings()) as service:
        (request,) = await webhook_sink.wait_for(1)
        rows = await wait_rows(conn, [nid], DONE, service)
        # the worker counts an outcome just after writing it back: wait (bounded) for the count
        sent = 'pgnotify_notifications_total{channel="webhook",outcome="sent",provider="webhook"}'
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            metrics = await (await _get(service, "/metrics")).text()
            if sent in metrics or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)

    row = rows[0]
    assert row["status"] == "sent"
    assert (row["attempts"], row["provider"]) == (1, "webhook")
    assert row["sent_at"] is not None and row["locked_by"] is None
    assert request.path == "/hooks/orders"
    # an independent Standard Webhooks verifier accepts what we sent
    body = Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert body["type"] == "order.shipped"
    assert body["data"] == {"order": 7}
    assert request.headers["webhook-id"] == f"pgn_{row['uid']}"
    assert request.headers["Content-Type"] == "application/json"
    assert await events_of(conn, nid) == ["claimed", "sent"]
    # one event row per attempt: the outcome carries when it was claimed (schema 0015)
    (event,) = await conn.fetch("SELECT * FROM pgnotify.events WHERE notification_id = $1", nid)
    assert (event["event"], event["attempt"]) == ("sent", 1) and event["worker"]
    assert event["claimed_at"] is not None and event["claimed_at"] <= event["created_at"]
    assert (
        'pgnotify_notifications_total{channel="webhook",outcome="sent",provider="webhook"} 1.0'
        in metrics
    )
    assert 'pgnotify_end_to_end_latency_seconds_count{channel="webhook"} 1.0' in metrics
    assert "127.0.0.1" not in metrics.replace('worker_id="', "")  # no recipient in any label


async def test_a_rendered_body_is_sent_as_is(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    await enqueue_webhook(
        conn, webhook_sink.url, body='{"text": "Order {{ order }} shipped"}', payload={"order": 7}
    )
    async with running(worker_settings()):
        (request,) = await webhook_sink.wait_for(1)
    assert request.json() == {"text": "Order 7 shipped"}
    Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)


async def _get(service: object, path: str) -> aiohttp.ClientResponse:
    port = service.http_port  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"http://127.0.0.1:{port}{path}")
        await response.read()
        return response


# --- retries and failures -------------------------------------------------------------------------


async def test_retry_then_success_keeps_the_webhook_id(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(status=503 if n == 1 else 200)
    nid = await enqueue_webhook(conn, webhook_sink.url)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("sent", 2)
    assert rows[0]["last_error"] is None  # a sent row shows no error; the history is in events
    history = await conn.fetch(
        "SELECT error FROM pgnotify.events WHERE notification_id = $1 AND error IS NOT NULL", nid
    )
    assert [r["error"] for r in history] == ["webhook 127.0.0.1 answered HTTP 503"]
    first, second = webhook_sink.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    for request in (first, second):
        Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    assert await events_of(conn, nid) == ["claimed", "retry_scheduled", "claimed", "sent"]


async def test_429_retry_after_is_honoured(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    def answer(_r: Received, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=204)

    webhook_sink.responder = answer
    nid = await enqueue_webhook(conn, webhook_sink.url)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "sent"
    first, second = webhook_sink.requests
    assert second.at - first.at >= 1.0  # not before the provider said
    detail = await conn.fetchval(
        "SELECT detail FROM pgnotify.events WHERE notification_id = $1 AND event = 'retry_scheduled'",
        nid,
    )
    assert "retry_at" in detail


async def test_permanent_4xx_fails_at_once(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(status=404)
    nid = await enqueue_webhook(conn, webhook_sink.url)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("failed", 1)
    assert rows[0]["last_error"] == "webhook 127.0.0.1 answered HTTP 404"
    assert len(webhook_sink.requests) == 1
    assert await events_of(conn, nid) == ["claimed", "failed"]


async def test_max_attempts_then_dead_with_the_error_kept(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(status=500)
    nid = await enqueue_webhook(conn, webhook_sink.url, max_attempts=3)
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("dead", 3)
    assert rows[0]["last_error"] == "webhook 127.0.0.1 answered HTTP 500 (gave up after 3 attempts)"
    assert len(webhook_sink.requests) == 3
    summary = await conn.fetchrow("SELECT * FROM pgnotify.error_summary WHERE dead > 0")
    assert summary["channel"] == "webhook" and summary["error_code"] == "http_500"


async def test_a_redirect_is_not_followed(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(
        status=302, headers={"Location": webhook_sink.url + "/elsewhere"}
    )
    nid = await enqueue_webhook(conn, webhook_sink.url + "/first")
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "failed"
    assert "redirects are not followed" in rows[0]["last_error"]
    assert [r.path for r in webhook_sink.requests] == ["/first"]


async def test_a_timeout_is_retried(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    release = asyncio.Event()

    async def answer(_r: Received, n: int) -> web.Response:
        if n == 1:
            await release.wait()  # longer than the worker waits
        return web.Response(status=200)

    webhook_sink.responder = answer
    nid = await enqueue_webhook(conn, webhook_sink.url)
    try:
        async with running(worker_settings(webhook_timeout=0.3)) as service:
            rows = await wait_rows(conn, [nid], DONE, service)
    finally:
        release.set()
    assert (rows[0]["status"], rows[0]["attempts"]) == ("sent", 2)
    code = await conn.fetchval(
        "SELECT error_code FROM pgnotify.events WHERE notification_id = $1 AND event = 'retry_scheduled'",
        nid,
    )
    assert code == "timeout"


# --- addresses a webhook must not reach -----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "refused addresses"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("2130706433", "invalid URL"),  # 127.0.0.1 as one decimal number: aiohttp refuses it
        ("10.1.2.3", "private"),
    ],
)
async def test_ssrf_targets_are_refused_without_a_connection(
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
    host: str,
    reason: str,
) -> None:
    port = webhook_sink.url.rsplit(":", 1)[1]
    # past the INSERT check (which refuses numeric private hosts): this is the send-time guard
    await conn.execute("SET pgnotify.webhook_allowed_networks = '0.0.0.0/0'")
    nid = await enqueue_webhook(conn, f"http://{host}:{port}/hook")
    async with running(worker_settings(webhook_allowed_networks="")) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "failed"
    assert reason in rows[0]["last_error"]
    if reason != "invalid URL":
        assert "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS" in rows[0]["last_error"]
    assert webhook_sink.requests == []


# --- time -------------------------------------------------------------------------------------------


async def test_a_future_run_at_is_not_sent_early(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(poll_interval=5.0)) as service:
        nid = await conn.fetchval(
            "SELECT pgnotify.enqueue('webhook', $1, run_at => now() + interval '800 milliseconds')",
            webhook_sink.url,
        )
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "sent"
    assert rows[0]["sent_at"] >= rows[0]["run_at"]
    late = (rows[0]["sent_at"] - rows[0]["run_at"]).total_seconds()
    assert late < 1.0  # the timer fired at run_at, not at the 5 s fallback poll


async def test_cancelled_before_its_time_is_never_sent(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings()) as service:
        later = await conn.fetchval(
            "SELECT pgnotify.enqueue('webhook', $1, run_at => now() + interval '300 milliseconds')",
            webhook_sink.url + "/later",
        )
        assert await conn.fetchval("SELECT pgnotify.cancel($1)", later) is True
        marker = await conn.fetchval(
            "SELECT pgnotify.enqueue('webhook', $1, run_at => now() + interval '600 milliseconds')",
            webhook_sink.url + "/marker",
        )
        await wait_rows(conn, [marker], DONE, service)
    assert [r.path for r in webhook_sink.requests] == ["/marker"]


async def test_priority_then_age_decides_the_order(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    ids = []
    for i, priority in enumerate([0, 5, 0, 9, 5]):
        ids.append(await enqueue_webhook(conn, f"{webhook_sink.url}/{i}", priority=priority))
    async with running(worker_settings(channel_concurrency="webhook=1")) as service:
        await wait_rows(conn, ids, DONE, service)
    assert [r.path for r in webhook_sink.requests] == ["/3", "/1", "/4", "/0", "/2"]


# --- wake-ups: NOTIFY helps, never needed ---------------------------------------------------------


async def test_trigger_disabled_rows_are_found_by_polling(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    # the wake-up is sent by the validation trigger (schema 0008); without it, only polls find rows
    await conn.execute("ALTER TABLE pgnotify.notifications DISABLE TRIGGER notifications_validate")
    async with running(worker_settings(poll_interval=0.3)) as service:
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient) "
            "SELECT 'webhook', $1 || '/' || g FROM generate_series(1, 50) g",
            webhook_sink.url,
        )
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.notifications")]
        rows = await wait_rows(conn, ids, DONE, service)
    assert {r["status"] for r in rows} == {"sent"}
    assert len(webhook_sink.requests) == 50


async def test_poll_only_mode_delivers_without_listen(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(listen=False, poll_interval=0.2)) as service:
        assert await (await _get(service, "/readyz")).json() == {"status": "ready"}
        active = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgnotify-worker listener'"
            " AND datname = current_database()"
        )
        assert active == 0
        nid = await enqueue_webhook(conn, webhook_sink.url)
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "sent"


async def test_a_killed_listener_reconnects_and_nothing_is_lost(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(poll_interval=30.0)) as service:
        for _ in range(3):
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgnotify-worker listener'"
                " AND datname = current_database()"
            )
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            async with asyncio.timeout(10):
                while service.listening.is_set():  # the loss is noticed...
                    await asyncio.sleep(0.01)
                await service.listening.wait()  # ...and the listener comes back
            nid = await enqueue_webhook(conn, webhook_sink.url)
            # with a 30 s fallback poll, only a working LISTEN delivers this quickly
            await wait_rows(conn, [nid], DONE, service, timeout=5)
        assert service.health.listener is not None and service.health.listener.reconnects == 3
        metrics = await (await _get(service, "/metrics")).text()
    assert "pgnotify_listener_reconnects_total 3.0" in metrics
    assert len(webhook_sink.requests) == 3


async def test_requeue_of_a_dead_row_is_delivered_at_once(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda r, n: web.Response(status=500 if n == 1 else 200)
    nid = await enqueue_webhook(conn, webhook_sink.url, max_attempts=1)
    async with running(worker_settings(poll_interval=30.0)) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
        assert rows[0]["status"] == "dead"
        assert await conn.fetchval("SELECT pgnotify.retry($1)", nid) is True
        rows = await wait_rows(conn, [nid], {"sent"}, service, timeout=5)
    assert await events_of(conn, nid) == ["claimed", "dead", "replayed", "claimed", "sent"]


# --- leases: slow sends, lost leases ----------------------------------------------------------------


async def test_a_send_slower_than_the_lease_is_not_sent_twice(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    async def slow(_r: Received, _n: int) -> web.Response:
        await asyncio.sleep(2.5)  # the provider is slow: 2.5 lease lengths
        return web.Response(status=200)

    webhook_sink.responder = slow
    nid = await enqueue_webhook(conn, webhook_sink.url)
    settings = worker_settings(lease_seconds=1.0, reap_interval=0.2, webhook_timeout=10.0)
    async with running(settings) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("sent", 1)
    assert len(webhook_sink.requests) == 1
    assert "lease_expired" not in await events_of(conn, nid)


async def test_an_outcome_is_not_written_once_the_lease_is_lost(
    dsn: str,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    other = await asyncpg.connect(dsn)

    async def steal(request: Received, _n: int) -> web.Response:
        # while the worker sends, another worker takes the row over (its lease expired)
        await other.execute(
            "UPDATE pgnotify.notifications SET locked_by = 'someone-else', attempts = attempts + 1"
        )
        return web.Response(status=200)

    webhook_sink.responder = steal
    nid = await enqueue_webhook(conn, webhook_sink.url)
    try:
        async with running(worker_settings()) as service:
            await webhook_sink.wait_for(1)
            async with asyncio.timeout(10):
                async with service.worker.progress:  # type: ignore[union-attr]
                    await service.worker.progress.wait()  # type: ignore[union-attr]
            metrics = await (await _get(service, "/metrics")).text()
    finally:
        await other.close()
    row = await conn.fetchrow("SELECT * FROM pgnotify.notifications WHERE id = $1", nid)
    assert (row["status"], row["locked_by"], row["attempts"]) == ("processing", "someone-else", 2)
    assert await events_of(conn, nid) == ["claimed"]  # no 'sent' written by the stale worker
    assert 'outcome="lost_lease"' in metrics


# --- templates ------------------------------------------------------------------------------------


async def test_stored_template_newest_version_in_the_best_locale(
    conn: asyncpg.Connection, tmp_path: Path, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        """
        INSERT INTO pgnotify.templates (key, channel, locale, version, subject, body, html_body) VALUES
          ('welcome', 'email', '',   1, 'Welcome {{ name }}', 'Hello {{ name }}', NULL),
          ('welcome', 'email', 'fr', 1, 'Bienvenue (v1)', 'v1', NULL),
          ('welcome', 'email', 'fr', 2, 'Bienvenue {{ name }}', 'Bonjour {{ name }}', '<p>{{ name }}</p>')
        """
    )
    ids = [
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', template => 'welcome', "
            "locale => $1, payload => $2)",
            locale,
            {"name": "Ada <3"},
        )
        for locale in ("fr-CA", "de", None)
    ]
    outbox = tmp_path / "outbox.jsonl"
    async with running(
        worker_settings(email_providers="file", file_sink_path=str(outbox))
    ) as service:
        rows = await wait_rows(conn, ids, DONE, service)
    sent = {m["id"]: m for m in map(json.loads, outbox.read_text().splitlines())}
    fr, de, default = (sent[i] for i in ids)
    assert (fr["subject"], fr["text"], fr["html"]) == (
        "Bienvenue Ada <3",
        "Bonjour Ada <3",
        "<p>Ada &lt;3</p>",
    )
    assert (de["subject"], de["text"]) == ("Welcome Ada <3", "Hello Ada <3")
    assert default["subject"] == "Welcome Ada <3"
    assert [r["template_version"] for r in rows] == [2, 1, 1]


async def test_template_problems_fail_permanently_with_the_reason(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    cases = {
        "Hi {{ name }}": "template variable 'name' is undefined",
        "{{ ''.__class__.__mro__ }}": "the sandbox refused",
        "{% for x in range(100000) %}{% for y in range(100000) %}{% endfor %}{% endfor %}": "iteration limit",
        "{% if %}": "syntax error",
    }
    ids = [
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => $1)", body
        )
        for body in cases
    ]
    settings = worker_settings(email_providers="file", file_sink_path=str(tmp_path / "o.jsonl"))
    async with running(settings) as service:
        rows = await wait_rows(conn, ids, DONE, service)
    for row, expected in zip(rows, cases.values(), strict=True):
        assert (row["status"], row["attempts"]) == ("failed", 1)
        assert expected in row["last_error"]
    assert not (tmp_path / "o.jsonl").exists()  # nothing was sent


# --- in-app -----------------------------------------------------------------------------------------


async def test_inapp_goes_to_the_inbox_once_and_notifies_live_clients(
    dsn: str, conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    live = await asyncpg.connect(dsn)
    pushed: asyncio.Queue[str] = asyncio.Queue()
    await live.add_listener("pgnotify_inbox", lambda *a: pushed.put_nowait(a[3]))
    try:
        nid = await conn.fetchval(
            "SELECT pgnotify.enqueue('inapp', user_id => 'user-7', subject => 'Hi {{ n }}', "
            "body => 'You have {{ n }} messages', payload => '{\"n\": 3}', category => 'chat')"
        )
        async with running(worker_settings()) as service:
            rows = await wait_rows(conn, [nid], DONE, service)
            message = json.loads(await asyncio.wait_for(pushed.get(), 5))
            # a retry of the same notification finds its inbox row instead of adding one
            again = await service.store.inbox_deliver(
                nid, user_id="user-7", category=None, title=None, body=None, data={}
            )  # type: ignore[union-attr]
    finally:
        await live.close()
    inbox = await conn.fetch("SELECT * FROM pgnotify.inbox")
    assert len(inbox) == 1
    assert (inbox[0]["user_id"], inbox[0]["title"], inbox[0]["body"], inbox[0]["category"]) == (
        "user-7",
        "Hi 3",
        "You have 3 messages",
        "chat",
    )
    assert message == {  # payload version 1 (docs/inbox.md)
        "v": 1,
        "event": "new",
        "id": inbox[0]["id"],
        "seq": inbox[0]["seq"],
        "user_id": "user-7",
        "notification_id": nid,
    }
    assert again == inbox[0]["id"]
    assert rows[0]["provider_message_id"] == f"inbox-{inbox[0]['id']}"
    assert await conn.fetchval("SELECT pgnotify.inbox_mark_read('user-7')") == 1


async def test_console_sink_prints_the_message_with_a_masked_recipient(
    conn: asyncpg.Connection,
    worker_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'Your code is {{ code }}', payload => '{\"code\": 4711}')"
    )
    async with running(worker_settings(sms_providers="console")) as service:
        await wait_rows(conn, [nid], DONE, service)
    out = capsys.readouterr().out
    assert "Your code is 4711" in out
    assert "+14155550123" not in out and "0123" in out


# --- operations: endpoints, secrets, graceful stop ---------------------------------------------------


async def test_health_readiness_and_status(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(channels="webhook,inapp", webhook_secret=None)) as service:
        assert (await _get(service, "/healthz")).status == 200
        ready = await _get(service, "/readyz")
        status = await (await _get(service, "/status")).json()
    assert ready.status == 200
    assert status["ready"] is True and status["listener"]["connected"] is True
    assert status["channels"]["webhook"]["enabled"] is False
    assert "PGNOTIFY_WEBHOOK_SECRET is not set" in status["channels"]["webhook"]["disabled_reason"]
    assert status["channels"]["inapp"] == {
        "enabled": True,
        "disabled_reason": None,
        "providers": ["inapp"],
        "circuits": {
            "inapp": {
                "state": "closed",
                "failures_in_a_row": 0,
                "last_failure": None,
                "probe_in_seconds": 0.0,
                "rate_per_second": None,
            }
        },
        "concurrency": 50,
        "in_flight": 0,
    }
    assert {row["channel"] for row in status["queue"]} == {
        "email",
        "sms",
        "push",
        "webhook",
        "inapp",
    }


async def test_rows_of_a_channel_without_provider_stay_queued(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    nid = await enqueue_webhook(conn, webhook_sink.url)
    marker = await conn.fetchval("SELECT pgnotify.enqueue('inapp', user_id => 'u', body => 'x')")
    async with running(worker_settings(webhook_secret=None)) as service:
        await wait_rows(conn, [marker], DONE, service)
    assert (
        await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", nid)
        == "queued"
    )
    assert webhook_sink.requests == []


async def test_no_secret_or_address_in_logs_status_or_metrics(
    pg_server: object,
    dsn: str,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_dsn = dsn.replace("postgres@", "postgres:CanaryDbPassw0rd@")  # trust auth ignores it
    webhook_sink.responder = lambda r, n: web.Response(status=500, text="ada.lovelace@example.com")
    await enqueue_webhook(conn, webhook_sink.url + "/ada.lovelace@example.com", max_attempts=2)
    await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada.lovelace@example.com', subject => 'Hi', body => 'Hi {{ missing }}')"
    )
    await conn.fetchval("SELECT pgnotify.enqueue('sms', '+14155550123', body => '{{ 1/0 }}')")
    settings = worker_settings(
        database_url=secret_dsn, email_providers="console", sms_providers="console"
    )
    async with running(settings) as service:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.notifications")]
        await wait_rows(conn, ids, DONE, service)
        status = await (await _get(service, "/status")).text()
        metrics = await (await _get(service, "/metrics")).text()
    stored = " ".join(
        str(r["last_error"])
        for r in await conn.fetch("SELECT last_error FROM pgnotify.notifications")
    )
    fields = [str(value) for record in caplog.records for value in vars(record).values()]
    everything = "\n".join([caplog.text, *fields, status, metrics, stored, repr(settings)])
    for canary in (
        "CanaryDbPassw0rd",
        WEBHOOK_SECRET,
        WEBHOOK_SECRET[6:],
        "ada.lovelace@example.com",
        "+14155550123",
    ):
        assert canary not in everything, canary
    recipients = {getattr(r, "recipient", None) for r in caplog.records}
    assert {"a***@e***.com", "+*******0123"} <= recipients  # masked forms are what logs carry


async def test_graceful_stop_hands_unfinished_sends_back(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    hang = asyncio.Event()

    async def stuck(_r: Received, _n: int) -> web.Response:
        await hang.wait()
        return web.Response(status=200)

    webhook_sink.responder = stuck
    ids = [await enqueue_webhook(conn, f"{webhook_sink.url}/{i}") for i in range(4)]
    try:
        async with running(worker_settings(grace_period=0.3, channel_concurrency="webhook=2")):
            await webhook_sink.wait_for(2)
        # the block exits: stop, 0.3 s grace, the two stuck sends are cut and handed back
    finally:
        hang.set()
    rows = await conn.fetch("SELECT * FROM pgnotify.notifications ORDER BY id")
    assert [r["status"] for r in rows] == ["queued"] * 4
    assert [r["attempts"] for r in rows] == [0] * 4  # a hand-back does not spend an attempt
    released = await conn.fetch(
        "SELECT notification_id FROM pgnotify.events WHERE event = 'released'"
    )
    # the two cut sends; rows claimed ahead of a free slot (a backlog), if any, never went out
    # and are handed back with them
    handed_back = sorted(r["notification_id"] for r in released)
    assert set(ids[:2]) <= set(handed_back) <= set(ids)
    assert len(webhook_sink.requests) == 2


async def test_an_unusable_listen_url_degrades_to_polling_and_says_so(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    from tests.support.pgcluster import free_port

    deaf = (
        f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # e.g. a pooler that drops LISTEN
    )
    settings = worker_settings(listen_database_url=deaf, poll_interval=0.3, connect_timeout=1.0)
    service = Service(settings, settings.database_url.get_secret_value(), deaf)  # type: ignore[union-attr]
    task = asyncio.create_task(service.run(install_signals=False))
    try:
        async with asyncio.timeout(15):
            await service.ready.wait()
        nid = await enqueue_webhook(conn, webhook_sink.url)
        rows = await wait_rows(conn, [nid], DONE, service)
        readyz = await _get(service, "/readyz")
        body = await readyz.json()
    finally:
        service.stop()
        await asyncio.wait_for(task, 15)
    assert rows[0]["status"] == "sent"  # the poll delivered it
    assert readyz.status == 503
    assert any(reason.startswith("listener not connected") for reason in body["reasons"])
