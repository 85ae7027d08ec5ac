"""The email, SMS and push providers end to end: a worker in this process, a real database, the
fake provider servers, and the delivery reports that come back through the worker's webhooks."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from pgnotify_worker.service import Service
from tests.fakes.fcm import FakeFCM
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.smtp import FakeSMTP
from tests.fakes.twilio import FakeTwilio, post_status_callback
from tests.fakes.webhooks_in import (
    SendGridSigner,
    post_webhook,
    resend_event,
    sendgrid_event,
    svix_headers,
)
from tests.support.db import wait_rows
from tests.support.worker import running

DONE = {"sent", "failed", "dead", "skipped"}
SENDER = "Acme <no-reply@acme.test>"
RESEND_KEY = "re_e2e_resend_key"
RESEND_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"resend-webhook-secret-0123456789").decode()
SENDGRID_KEY = "SG.e2e-sendgrid-key"
TWILIO_SID = "AC" + "7" * 32
TWILIO_TOKEN = "e2e-twilio-auth-token"
TWILIO_FROM = "+15005550006"


async def enqueue(conn: asyncpg.Connection, channel: str, **kw: Any) -> int:
    args = ", ".join(f"{name} => ${i + 2}" for i, name in enumerate(kw))
    nid: int = await conn.fetchval(
        f"SELECT pgnotify.enqueue(channel => $1{', ' + args if args else ''})",
        channel,
        *kw.values(),
    )
    return nid


async def email(conn: asyncpg.Connection, recipient: str = "ada@example.com") -> int:
    return await enqueue(
        conn, "email", recipient=recipient, subject="Your order", body="Order 7 shipped."
    )


async def events_of(conn: asyncpg.Connection, nid: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM pgnotify.events WHERE notification_id = $1 ORDER BY id", nid
    )


async def suppressions(conn: asyncpg.Connection) -> list[tuple[str, str, str, str]]:
    rows = await conn.fetch(
        "SELECT channel, address, reason, source FROM pgnotify.suppressions ORDER BY created_at"
    )
    return [(r["channel"], r["address"], r["reason"], r["source"]) for r in rows]


def base_url(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


async def get(service: Service, path: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(base_url(service) + path) as response,
    ):
        return response.status, await response.text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def resend_fake() -> AsyncIterator[FakeResend]:
    async with FakeResend(RESEND_KEY) as fake:
        yield fake


@pytest.fixture
async def smtp_fake() -> AsyncIterator[FakeSMTP]:
    async with FakeSMTP() as fake:
        yield fake


def resend_settings(fake: FakeResend, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "email_providers": "resend",
        "resend_api_key": RESEND_KEY,
        "resend_base_url": fake.url,
        "email_from": SENDER,
    }
    values.update(overrides)
    return values


# --- 1. email through Resend ----------------------------------------------------------------------


async def test_email_is_sent_through_resend(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    nid = await email(conn)
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)

    assert (row["status"], row["provider"], row["attempts"]) == ("sent", "resend", 1)
    assert row["provider_message_id"] == resend_fake.sent_ids[0]
    (sent,) = resend_fake.sent
    assert (sent["to"], sent["from"], sent["subject"]) == (
        ["ada@example.com"],
        SENDER,
        "Your order",
    )
    assert sent["text"] == "Order 7 shipped."
    assert resend_fake.requests[0].header("idempotency-key") == f"pgn_{row['uid']}"
    assert [e["event"] for e in await events_of(conn, nid)] == ["sent"]  # one row per attempt


async def test_resend_retry_keeps_the_idempotency_key_and_sends_once(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    resend_fake.fail_next(1, status=503)
    nid = await email(conn)
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)

    assert (row["status"], row["attempts"], row["provider"]) == ("sent", 2, "resend")
    first, second = resend_fake.requests
    assert (
        first.header("idempotency-key") == second.header("idempotency-key") == f"pgn_{row['uid']}"
    )
    assert len(resend_fake.sent) == 1
    assert row["provider_message_id"] == resend_fake.sent_ids[0]
    events = await events_of(conn, nid)
    assert [e["event"] for e in events] == ["retry_scheduled", "sent"]
    assert events[0]["error_code"] == "http_503"


# --- 2. failover ----------------------------------------------------------------------------------


async def test_failover_to_smtp_while_resends_circuit_is_open(
    conn: asyncpg.Connection,
    resend_fake: FakeResend,
    smtp_fake: FakeSMTP,
    worker_settings: Callable[..., Settings],
) -> None:
    resend_fake.fail_next(100, status=503)
    settings = worker_settings(
        **resend_settings(resend_fake, email_providers="resend,smtp"),
        smtp_host=smtp_fake.host,
        smtp_port=smtp_fake.port,
        smtp_security="none",
        circuit_failure_threshold=1,
    )
    async with running(settings) as service:
        first = await email(conn, "ada@example.com")
        await wait_rows(conn, [first], DONE, service)
        second = await email(conn, "grace@example.com")
        rows = await wait_rows(conn, [first, second], DONE, service)
        _, metrics = await get(service, "/metrics")

    assert [(r["status"], r["provider"], r["attempts"]) for r in rows] == [("sent", "smtp", 1)] * 2
    assert [r["provider_message_id"] for r in rows] == [f"<pgn_{r['uid']}@acme.test>" for r in rows]
    assert len(resend_fake.requests) == 1  # the second row never went to the paused provider
    received = await smtp_fake.wait_for(2)
    assert [m.rcpt_tos for m in received] == [["ada@example.com"], ["grace@example.com"]]
    assert 'pgnotify_provider_circuit_state{provider="resend"} 2.0' in metrics


# --- 3. Twilio STOP -------------------------------------------------------------------------------


@pytest.fixture
async def twilio_fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(TWILIO_SID, TWILIO_TOKEN) as fake:
        yield fake


def twilio_settings(fake: FakeTwilio, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "sms_providers": "twilio",
        "twilio_account_sid": TWILIO_SID,
        "twilio_auth_token": TWILIO_TOKEN,
        "twilio_from": TWILIO_FROM,
        "twilio_base_url": fake.url,
    }
    values.update(overrides)
    return values


async def test_twilio_stop_fails_the_row_and_suppresses_the_number(
    conn: asyncpg.Connection, twilio_fake: FakeTwilio, worker_settings: Callable[..., Settings]
) -> None:
    twilio_fake.error_for_number["+14155552671"] = 21610
    nid = await enqueue(conn, "sms", recipient="+14155552671", body="Your code is 123456")
    async with running(worker_settings(**twilio_settings(twilio_fake))) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)

    assert (row["status"], row["attempts"], row["provider"]) == ("failed", 1, "twilio")
    assert "STOP" in row["last_error"]
    assert await suppressions(conn) == [("sms", "+14155552671", "unsubscribed", "twilio")]
    assert twilio_fake.sent == []


async def test_twilio_stop_suppresses_the_e164_form_of_a_national_number(
    conn: asyncpg.Connection, twilio_fake: FakeTwilio, worker_settings: Callable[..., Settings]
) -> None:
    twilio_fake.error_for_number["+14155552671"] = 21610
    nid = await enqueue(conn, "sms", recipient="(415) 555-2671", body="Your code is 123456")
    async with running(worker_settings(**twilio_settings(twilio_fake))) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)
    assert row["status"] == "failed"
    assert twilio_fake.requests[0].form == {
        "To": "+14155552671",
        "From": TWILIO_FROM,
        "Body": "Your code is 123456",
    }
    assert await suppressions(conn) == [("sms", "+14155552671", "unsubscribed", "twilio")]


# --- 4. push to a user's devices ------------------------------------------------------------------


async def test_push_goes_to_each_device_and_a_dead_token_is_deactivated(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        fake.unregistered.add("token-dead")
        alive = await conn.fetchval(
            "SELECT pgnotify.register_device('u-7', 'android', 'token-alive')"
        )
        dead = await conn.fetchval("SELECT pgnotify.register_device('u-7', 'ios', 'token-dead')")
        nid = await enqueue(
            conn, "push", user_id="u-7", subject="Shipped", body="Order 7", payload={"order": 7}
        )
        settings = worker_settings(
            push_providers="fcm",
            fcm_service_account=json.dumps(fake.service_account),
            fcm_base_url=fake.url,
        )
        async with running(settings) as service:
            (row,) = await wait_rows(conn, [nid], DONE, service)
    finally:
        await fake.stop()

    assert (row["status"], row["provider"], row["recipient"]) == ("sent", "fcm", "user:u-7")
    (pushed,) = fake.sent
    assert pushed == {
        "token": "token-alive",
        "notification": {"title": "Shipped", "body": "Order 7"},
        "data": {"order": "7"},
    }
    assert row["provider_message_id"].startswith("projects/demo-project/messages/")
    devices = await conn.fetch(
        "SELECT id, active, deactivation_reason FROM pgnotify.devices ORDER BY id"
    )
    assert [(d["id"], d["active"], d["deactivation_reason"]) for d in devices] == [
        (alive, True, None),
        (dead, False, "fcm_UNREGISTERED"),
    ]
    per_device = {
        e["detail"]["device_id"]: (e["event"], e["error_code"])
        for e in await events_of(conn, nid)
        if e["event"].startswith("device_")
    }
    assert per_device == {
        alive: ("device_sent", None),
        dead: ("device_permanent", "fcm_UNREGISTERED"),
    }
    assert await suppressions(conn) == []  # a dead token is deactivated, not suppressed


# --- 5. a provider without credentials ------------------------------------------------------------


async def test_rows_of_a_channel_without_credentials_stay_queued(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    settings = worker_settings(
        **resend_settings(resend_fake, resend_api_key=None),
        webhook_providers="console",  # a channel that works, to know the worker went round
    )
    nid = await email(conn)
    async with running(settings) as service:
        barrier = await enqueue(conn, "webhook", recipient="https://example.com/hook")
        await wait_rows(conn, [barrier], DONE, service)
        status_code, text = await get(service, "/status")
        _, metrics = await get(service, "/metrics")
        row = await conn.fetchrow("SELECT * FROM pgnotify.notifications WHERE id = $1", nid)

    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert resend_fake.requests == []
    assert status_code == 200
    channel = json.loads(text)["channels"]["email"]
    assert channel["enabled"] is False
    assert "PGNOTIFY_RESEND_API_KEY" in channel["disabled_reason"]
    assert channel["providers"] == []
    assert 'pgnotify_channel_enabled{channel="email"} 0.0' in metrics


# --- 6. delivery reports coming back --------------------------------------------------------------


async def test_resend_bounce_report_adds_an_event_and_a_suppression_once(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    nid = await email(conn, "Ada.Lovelace@Example.COM")
    settings = worker_settings(
        **resend_settings(resend_fake), resend_webhook_secret=RESEND_WEBHOOK_SECRET
    )
    async with running(settings) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)
        url = base_url(service) + "/webhooks/resend"
        bounce = {"type": "Permanent", "subType": "General", "message": "Mailbox does not exist"}
        body = json.dumps(resend_event("email.bounced", row["provider_message_id"], bounce=bounce))
        headers = svix_headers(RESEND_WEBHOOK_SECRET, body.encode())
        first = await post_webhook(url, body.encode(), headers)
        again = await post_webhook(url, body.encode(), headers)  # Svix retries with the same id
        complaint = json.dumps(resend_event("email.complained", row["provider_message_id"]))
        forged_secret = "whsec_" + base64.b64encode(b"not-the-configured-secret-000000").decode()
        forged = await post_webhook(
            url, complaint.encode(), svix_headers(forged_secret, complaint.encode())
        )
        unsigned = await post_webhook(url, complaint.encode(), {})

    assert first[0] == 200 and json.loads(first[1]) == {"recorded": 1}
    assert again[0] == 200 and json.loads(again[1]) == {"recorded": 0}
    assert forged[0] == unsigned[0] == 401
    reports = [
        e for e in await events_of(conn, nid) if e["provider"] == "resend" and e["external_id"]
    ]
    assert [(e["event"], e["error_code"]) for e in reports] == [("bounced", "resend_bounced")]
    assert reports[0]["external_id"] == headers["svix-id"]
    assert await suppressions(conn) == [
        ("email", "ada.lovelace@example.com", "hard_bounce", "resend")
    ]


async def test_sendgrid_spam_report_adds_an_event_and_a_suppression_once(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    signer = SendGridSigner()
    async with FakeSendGrid(SENDGRID_KEY) as fake:
        nid = await email(conn)
        settings = worker_settings(
            email_providers="sendgrid",
            sendgrid_api_key=SENDGRID_KEY,
            sendgrid_base_url=fake.url,
            email_from=SENDER,
            sendgrid_webhook_public_key=signer.public_key_b64,
        )
        async with running(settings) as service:
            (row,) = await wait_rows(conn, [nid], DONE, service)
            url = base_url(service) + "/webhooks/sendgrid"
            # SendGrid puts custom_args at the top level of each event
            spam = sendgrid_event(
                "spamreport", fake.message_ids[0], "ada@example.com", notification_id=str(nid)
            )
            delivered = sendgrid_event("delivered", fake.message_ids[0], "ada@example.com")
            body = SendGridSigner.body([delivered, spam])
            first = await post_webhook(url, body, signer.headers(body))
            again = await post_webhook(url, body, signer.headers(body))
            later = SendGridSigner.body([sendgrid_event("bounce", fake.message_ids[0])])
            forged = await post_webhook(url, later, SendGridSigner().headers(later))
            tampered = await post_webhook(url, later, signer.headers(body))

    assert (row["status"], row["provider"]) == ("sent", "sendgrid")
    assert row["provider_message_id"] == fake.message_ids[0]
    assert first[0] == 200 and json.loads(first[1]) == {"recorded": 2}
    assert again[0] == 200 and json.loads(again[1]) == {"recorded": 0}
    assert forged[0] == tampered[0] == 401
    reports = [
        e["event"]
        for e in await events_of(conn, nid)
        if e["provider"] == "sendgrid" and e["external_id"]
    ]
    assert sorted(reports) == ["complained", "delivered"]
    assert await suppressions(conn) == [("email", "ada@example.com", "complaint", "sendgrid")]


async def test_twilio_status_callback_adds_an_event_and_a_suppression_once(
    conn: asyncpg.Connection, twilio_fake: FakeTwilio, worker_settings: Callable[..., Settings]
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    settings = worker_settings(
        **twilio_settings(twilio_fake), http_port=port, public_base_url=public
    )
    nid = await enqueue(conn, "sms", recipient="+14155550123", body="Your code is 123456")
    async with running(settings) as service:
        (row,) = await wait_rows(conn, [nid], DONE, service)
        sid = row["provider_message_id"]
        callback = twilio_fake.status_callbacks[sid]
        first = await twilio_fake.send_status_callback(sid, "undelivered", error_code=30006)
        again = await twilio_fake.send_status_callback(sid, "undelivered", error_code=30006)
        params = twilio_fake.status_callback_params(sid, "delivered")
        forged = await post_status_callback(callback, "not-the-auth-token", params)

    assert (row["status"], row["provider"]) == ("sent", "twilio")
    assert sid == twilio_fake.sent[0]["sid"]
    assert callback == f"{public}/webhooks/twilio"  # requested by the worker with each send
    assert first[0] == 200 and json.loads(first[1]) == {"recorded": 1}
    assert again[0] == 200 and json.loads(again[1]) == {"recorded": 0}
    assert forged[0] == 401
    reports = [
        (e["event"], e["error_code"])
        for e in await events_of(conn, nid)
        if e["provider"] == "twilio" and e["external_id"]
    ]
    assert reports == [("delivery_failed", "twilio_30006")]
    assert await suppressions(conn) == [("sms", "+14155550123", "invalid_number", "twilio")]


# --- 7. an open circuit is visible and holds rows back --------------------------------------------


async def test_open_circuit_shows_in_status_and_metrics_and_rows_wait(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    settings = worker_settings(**resend_settings(resend_fake, resend_api_key="re_revoked_key"))
    async with running(settings) as service:
        first = await email(conn)
        (row,) = await wait_rows(conn, [first], {"scheduled"}, service)
        later = [await email(conn, f"user{i}@example.com") for i in range(2)]
        # the first row's retry comes due (Resend's reset header: ~1 s) and is not claimed
        # either: it waits queued, like the rows that arrived while the circuit was open
        rows = await wait_rows(conn, [first, *later], {"queued"}, service)
        _, text = await get(service, "/status")
        _, metrics = await get(service, "/metrics")

    assert row["attempts"] == 1 and row["last_error"].startswith("resend invalid_api_key")
    assert [(r["status"], r["attempts"]) for r in rows] == [
        ("queued", 1),
        ("queued", 0),
        ("queued", 0),
    ]
    assert len(resend_fake.requests) == 1
    circuit = json.loads(text)["channels"]["email"]["circuits"]["resend"]
    assert circuit["state"] == "open"
    assert "invalid_api_key" in circuit["last_failure"]
    assert circuit["probe_in_seconds"] > 0
    assert 'pgnotify_provider_circuit_state{provider="resend"} 2.0' in metrics
