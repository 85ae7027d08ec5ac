"""Contract 7 end to end: with providers that echo our requests in their errors (Authorization
header, body, recipient), no configured secret, credential or recipient address reaches the logs,
notifications.last_error, the events, /status, /readyz or /metrics, whatever the error path: 4xx,
5xx, timeouts, a paused provider, template render errors, database errors.

Each test runs a real worker against the fake provider servers, configured with canary secrets,
and searches everything it produced for every canary in every encoding."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.logs import setup_logging
from pgnotify_worker.service import Service
from tests.fakes.base import Body
from tests.fakes.fcm import FakeFCM
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.smtp import FakeSMTP
from tests.fakes.twilio import FakeTwilio
from tests.fakes.webhooks_in import post_webhook, resend_event, svix_headers
from tests.support.db import wait_rows
from tests.support.worker import running

DONE = {"sent", "failed", "dead", "skipped"}
SENDER = "Acme <no-reply@acme.test>"
RESEND_KEY = "re_CANARYresendKEY123456"
SENDGRID_KEY = "SG.CANARYsendgrid.KEY"
TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "CANARYtwilioTOKEN0123456789abcd"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"CANARYwebhookSECRET-0123456789").decode()
UNSUBSCRIBE_SECRET = "CANARYunsubscribeSECRET-0123456789"
DB_PASSWORD = "CANARYdbPASS42"
EMAIL = "ada.canary@example.com"
PHONE = "+15005550199"
CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


# --- what must never show up ------------------------------------------------------------------


def b64_forms(raw: str) -> list[str]:
    std = base64.b64encode(raw.encode()).decode()
    url = base64.urlsafe_b64encode(raw.encode()).decode()
    return [std, std.rstrip("="), url, url.rstrip("=")]


def forms(secret: str) -> list[str]:
    """A secret as it may leak: raw, URL-encoded, JSON-escaped, base64 (both alphabets)."""
    found = [
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        *b64_forms(secret),
    ]
    return [f for f in dict.fromkeys(found) if len(f) >= 6]


def canaries(*secrets: str, pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """form -> what it is, for every secret and pair, and the recipients unmasked."""
    found: dict[str, str] = {}
    for secret in secrets:
        for form in forms(secret):
            found.setdefault(form, f"secret {secret[:12]}…")
    for user, secret in pairs:
        for form in b64_forms(f"{user}:{secret}"):
            found.setdefault(form, f"basic credential of {user[:6]}…")
    for form in (EMAIL, quote(EMAIL), quote(EMAIL, safe=""), "ada.canary%2540example.com"):
        found[form] = "recipient email"
    for form in (PHONE, quote(PHONE, safe=""), PHONE[1:], "%2B" + PHONE[1:], "5005550199"):
        found[form] = "recipient phone"
    return found


# --- where to look -----------------------------------------------------------------------------


@dataclass
class Logs:
    """The JSON lines the worker wrote, and the records pytest captured beside them."""

    stream: io.StringIO
    caplog: pytest.LogCaptureFixture

    def getvalue(self) -> str:
        return self.stream.getvalue()

    def captured(self) -> str:
        return "\n".join(
            f"{r.getMessage()} {r.__dict__.get('error_code')}" for r in self.caplog.records
        )


@pytest.fixture
def json_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[Settings], Logs]]:
    """The worker's own JSON log stream, as `pgnotify-worker run` sets it up, at DEBUG (the
    records pytest captures are checked too: scrubbing happens as a record is made)."""
    root = logging.getLogger()
    level = root.level
    factory = logging.getLogRecordFactory()
    streams: list[io.StringIO] = []

    def install(settings: Settings) -> Logs:
        stream = io.StringIO()
        assert settings.worker_id is not None
        setup_logging(
            "DEBUG",
            "json",
            settings.worker_id,
            Scrubber(settings.secret_values(), settings.secret_pairs()),
            stream=stream,
        )
        streams.append(stream)
        return Logs(stream, caplog)

    yield install
    for handler in list(root.handlers):
        if getattr(handler, "_pgnotify", False):
            root.removeHandler(handler)
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


async def http_get(service: Service, path: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    url = f"http://127.0.0.1:{service.http_port}{path}"
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return await response.text()


async def outputs(conn: asyncpg.Connection, service: Service) -> dict[str, str]:
    """Everything the worker showed or stored that is not the notification itself."""
    notifications = await conn.fetch(
        "SELECT id, status, last_error FROM pgnotify.notifications ORDER BY id"
    )
    events = await conn.fetch(
        "SELECT notification_id, event, error_code, error, detail::text AS detail "
        "FROM pgnotify.events ORDER BY id"
    )
    return {
        "/status": await http_get(service, "/status"),
        "/readyz": await http_get(service, "/readyz"),
        "/metrics": await http_get(service, "/metrics"),
        "notifications.last_error": "\n".join(str(r["last_error"]) for r in notifications),
        "events.error": "\n".join(str(r["error"]) for r in events),
        "events.error_code": "\n".join(str(r["error_code"]) for r in events),
        "events.detail": "\n".join(str(r["detail"]) for r in events),
    }


def assert_no_leak(found: dict[str, str], secret_forms: dict[str, str]) -> None:
    leaks = [
        f"{what} ({form[:6]}…) in {where}"
        for where, text in found.items()
        for form, what in secret_forms.items()
        if form in text
    ]
    assert not leaks, "\n".join(leaks)


async def error_codes(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT error_code FROM pgnotify.events WHERE error_code IS NOT NULL"
    )
    return [r["error_code"] for r in rows]


# --- the paths -----------------------------------------------------------------------------------


async def enqueue(conn: asyncpg.Connection, channel: str, **kw: Any) -> int:
    kw.setdefault("max_attempts", 1)  # a retryable failure goes dead at once: fast and final
    args = ", ".join(f"{name} => ${i + 2}" for i, name in enumerate(kw))
    nid: int = await conn.fetchval(
        f"SELECT pgnotify.enqueue(channel => $1, {args})", channel, *kw.values()
    )
    return nid


async def deliver(
    conn: asyncpg.Connection, service: Service, channel: str, recipient: str, **kw: Any
) -> asyncpg.Record:
    kw.setdefault("subject", "Your order")
    # the content names the recipient when it is an address (patterns find those anywhere);
    # a device token in free content is not recognisable as one (see the report)
    shown = recipient if channel in ("email", "sms") else "your device"
    kw.setdefault("body", f"Order 7 shipped to {shown}.")
    nid = await enqueue(conn, channel, recipient=recipient, **kw)
    (row,) = await wait_rows(conn, [nid], DONE, service, timeout=15)
    return row


def base_settings(dsn: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        # the test cluster trusts local connections: the canary password is sent, never checked
        "database_url": dsn.replace("://postgres@", f"://postgres:{DB_PASSWORD}@", 1),
        "webhook_secret": WEBHOOK_SECRET,
        "unsubscribe_secret": UNSUBSCRIBE_SECRET,
        "provider_timeout": 0.5,
        "circuit_failure_threshold": 100,  # only a deliberate trip opens a circuit
        "email_from": SENDER,
    }
    values.update(overrides)
    return values


async def render_and_database_errors(conn: asyncpg.Connection, service: Service) -> None:
    """A render error quoting a payload value, a missing layout named by a secret, and database
    errors whose text carries an address and a key (as a constraint violation's would)."""
    row = await deliver(
        conn,
        service,
        "email",
        EMAIL,
        body="{{ d[email].x }}",
        payload={"d": {}, "email": EMAIL},
    )
    assert (row["status"], row["last_error"] is not None) == ("failed", True)
    row = await deliver(
        conn, service, "email", EMAIL, body="{% include key %}", payload={"key": RESEND_KEY}
    )
    assert row["status"] == "failed"
    assert service.worker is not None
    service.worker._db_failed(
        "complete",
        asyncpg.exceptions.UniqueViolationError(
            f"duplicate key: Key (recipient, token)=({EMAIL}, Bearer {RESEND_KEY}) exists"
        ),
    )
    service.worker._db_failed(
        "claim", OSError(f"connect to postgresql://app:{DB_PASSWORD}@db failed for {PHONE}")
    )


# --- 1. Resend ---------------------------------------------------------------------------------


@pytest.fixture
async def resend() -> AsyncIterator[FakeResend]:
    async with FakeResend(RESEND_KEY) as fake:
        yield fake


def resend_error(status: int, name: str | None = None) -> Callable[[str], Body]:
    return lambda echo: {"statusCode": status, "name": name or echo[:80], "message": echo}


async def test_resend_echoes_leak_nothing(
    conn: asyncpg.Connection,
    dsn: str,
    resend: FakeResend,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    settings = worker_settings(
        **base_settings(
            dsn,
            email_providers="resend",
            resend_api_key=RESEND_KEY,
            resend_base_url=resend.url,
        )
    )
    logs = json_logs(settings)
    async with running(settings) as service:
        # 4xx whose error `name` itself is the echo (it becomes part of the error code)
        resend.echo_next(1, status=422, shape=resend_error(422))
        assert (await deliver(conn, service, "email", EMAIL))["status"] == "failed"
        resend.echo_next(1, status=422, shape=resend_error(422, "validation_error"))
        assert (await deliver(conn, service, "email", EMAIL))["status"] == "failed"
        resend.echo_next(1, status=503, shape=resend_error(503, "application_error"))
        assert (await deliver(conn, service, "email", EMAIL))["status"] == "dead"
        resend.hang_next(1)
        row = await deliver(conn, service, "email", EMAIL)
        assert row["status"] == "dead"
        assert row["last_error"].startswith("resend did not answer in time")
        await render_and_database_errors(conn, service)
        # last: a refused key pauses the provider, its echo becomes the circuit's reason
        resend.echo_next(1, status=401, shape=resend_error(401, "invalid_api_key"))
        row = await deliver(conn, service, "email", EMAIL)
        assert row["status"] == "dead"
        status = json.loads(await http_get(service, "/status"))
        circuit = status["channels"]["email"]["circuits"]["resend"]
        assert circuit["state"] == "open"
        assert circuit["last_failure"].startswith("resend invalid_api_key: ")
        found = await outputs(conn, service)
    found["logs"] = logs.getvalue()
    found["captured logs"] = logs.captured()

    assert len(resend.requests) == 5
    assert all(RESEND_KEY in r.header("authorization", "") for r in resend.requests)
    assert_no_leak(found, canaries(RESEND_KEY, WEBHOOK_SECRET, UNSUBSCRIBE_SECRET, DB_PASSWORD))
    assert "Authorization: ***" in found["notifications.last_error"]  # scrubbed, not dropped
    assert "a***@e***.com" in found["notifications.last_error"]
    assert all(CODE.fullmatch(code) for code in await error_codes(conn))
    assert "template_variable" in found["events.error_code"]
    assert "resend_invalid_api_key" in found["events.error_code"]
    entries = [json.loads(line) for line in found["logs"].splitlines()]
    assert any(e.get("action") == "circuit_open" for e in entries)
    assert any(e.get("action") == "complete_failed" for e in entries)  # the DB error path


# --- 2. SendGrid -------------------------------------------------------------------------------


async def test_sendgrid_echoes_leak_nothing(
    conn: asyncpg.Connection,
    dsn: str,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    def errors(echo: str) -> Body:
        return {"errors": [{"message": echo, "field": "personalizations.0.to", "help": None}]}

    async with FakeSendGrid(SENDGRID_KEY) as fake:
        settings = worker_settings(
            **base_settings(
                dsn,
                email_providers="sendgrid",
                sendgrid_api_key=SENDGRID_KEY,
                sendgrid_base_url=fake.url,
            )
        )
        logs = json_logs(settings)
        async with running(settings) as service:
            fake.echo_next(1, status=400, shape=errors)
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "failed"
            fake.echo_next(1, status=500, shape=errors)
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "dead"
            fake.hang_next(1)
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "dead"
            fake.echo_next(1, status=401, shape=errors)  # pauses sendgrid: its reason in /status
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "dead"
            found = await outputs(conn, service)
        found["logs"] = logs.getvalue()
        found["captured logs"] = logs.captured()
        assert len(fake.requests) == 4

    assert_no_leak(found, canaries(SENDGRID_KEY, WEBHOOK_SECRET, UNSUBSCRIBE_SECRET, DB_PASSWORD))
    assert "sendgrid HTTP 401: " in found["/status"]
    assert all(CODE.fullmatch(code) for code in await error_codes(conn))


# --- 3. Twilio ---------------------------------------------------------------------------------


async def test_twilio_echoes_leak_nothing(
    conn: asyncpg.Connection,
    dsn: str,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    def twilio_error(code: int, status: int) -> Callable[[str], Body]:
        return lambda echo: {"code": code, "message": echo, "status": status}

    async with FakeTwilio(TWILIO_SID, TWILIO_TOKEN) as fake:
        settings = worker_settings(
            **base_settings(
                dsn,
                sms_providers="twilio",
                twilio_account_sid=TWILIO_SID,
                twilio_auth_token=TWILIO_TOKEN,
                twilio_from="+15005550006",
                twilio_base_url=fake.url,
            )
        )
        logs = json_logs(settings)
        async with running(settings) as service:
            fake.echo_next(1, status=400, shape=twilio_error(21211, 400))
            assert (await deliver(conn, service, "sms", PHONE))["status"] == "failed"
            fake.echo_next(1, status=400, shape=twilio_error(21602, 400))  # not a known code
            assert (await deliver(conn, service, "sms", "+15005550198"))["status"] == "failed"
            fake.echo_next(1, status=503, shape=twilio_error(20503, 503))
            assert (await deliver(conn, service, "sms", "+15005550197"))["status"] == "dead"
            fake.hang_next(1)
            assert (await deliver(conn, service, "sms", "+15005550196"))["status"] == "dead"
            fake.echo_next(1, status=401, shape=twilio_error(20003, 401))
            assert (await deliver(conn, service, "sms", "+15005550195"))["status"] == "dead"
            found = await outputs(conn, service)
        found["logs"] = logs.getvalue()
        found["captured logs"] = logs.captured()
        authorization = fake.requests[0].header("authorization") or ""

    basic = base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
    assert authorization == f"Basic {basic}"
    secrets = canaries(
        TWILIO_TOKEN,
        WEBHOOK_SECRET,
        UNSUBSCRIBE_SECRET,
        DB_PASSWORD,
        pairs=((TWILIO_SID, TWILIO_TOKEN),),
    )
    for number in ("+15005550198", "+15005550197", "+15005550196", "+15005550195"):
        secrets.update({number: "a recipient", quote(number, safe=""): "a recipient"})
    assert_no_leak(found, secrets)
    assert "twilio_21211" in found["events.error_code"]
    assert "Authorization: ***" in found["notifications.last_error"]
    assert all(CODE.fullmatch(code) for code in await error_codes(conn))


# --- 4. FCM: the token endpoint and sends --------------------------------------------------------


async def test_fcm_echoes_leak_neither_key_nor_assertion_nor_access_token(
    conn: asyncpg.Connection,
    dsn: str,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        assert fake.service_account is not None
        account = json.dumps(fake.service_account)
        settings = worker_settings(
            **base_settings(
                dsn, push_providers="fcm", fcm_service_account=account, fcm_base_url=fake.url
            )
        )
        logs = json_logs(settings)
        device = "canary-device-token-0001"

        def token_error(echo: str) -> Body:
            return {"error": "invalid_grant", "error_description": echo}

        async with running(settings) as service:
            # the token endpoint fails and repeats our signed assertion
            fake.echo_next(1, status=500, shape=token_error, channel="token")
            assert (await deliver(conn, service, "push", device))["status"] == "dead"
            # sends that repeat our access token
            fake.echo_next(1, status=400, shape=lambda echo: FakeFCM.error(400, echo))
            assert (await deliver(conn, service, "push", device))["status"] == "failed"
            fake.echo_next(1, status=503, shape=lambda echo: FakeFCM.error(503, echo))
            assert (await deliver(conn, service, "push", device))["status"] == "dead"
            fake.hang_next(1)
            assert (await deliver(conn, service, "push", device))["status"] == "dead"
            # last: the access token is refused, the renewal too (the key is bad): paused
            fake.expire_tokens()
            fake.echo_next(1, status=400, shape=token_error, channel="token")
            assert (await deliver(conn, service, "push", device))["status"] == "dead"
            found = await outputs(conn, service)
        found["logs"] = logs.getvalue()
        found["captured logs"] = logs.captured()
    finally:
        await fake.stop()

    assertions = [r.form["assertion"] for r in fake.token_requests if r.form]
    assert len(assertions) >= 3
    access_tokens = list(fake.issued)
    assert access_tokens
    pem = fake.service_account["private_key"]
    key_lines = [line for line in pem.splitlines() if line and "-----" not in line]
    secrets = canaries(
        account, *assertions, *access_tokens, WEBHOOK_SECRET, UNSUBSCRIBE_SECRET, DB_PASSWORD
    )
    for line in key_lines[1:-1]:  # whole lines of the private key, in any context
        secrets[line] = "a line of the private key"
    secrets[json.dumps(pem)[1:40]] = "the private key, JSON-escaped"
    for assertion in assertions:
        for part in assertion.split("."):
            secrets[part] = "a part of the signed assertion"
    secrets[device] = "the device token (the push recipient)"
    assert_no_leak(found, secrets)
    assert "assertion=***" in found["notifications.last_error"]
    assert "Authorization: ***" in found["notifications.last_error"]  # the access token
    assert all(CODE.fullmatch(code) for code in await error_codes(conn))


# --- 5. SMTP: replies that quote the AUTH exchange and the recipient ------------------------------


async def test_smtp_replies_leak_neither_password_nor_recipient(
    conn: asyncpg.Connection,
    dsn: str,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    user, password = "mailer-canary", "CANARYsmtpPASSWORD/+=9"
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    other = "grace.canary@example.org"
    async with FakeSMTP(username=user, password=password) as fake:
        settings = worker_settings(
            **base_settings(
                dsn,
                email_providers="smtp",
                smtp_host=fake.host,
                smtp_port=fake.port,
                smtp_security="none",
                smtp_username=user,
                smtp_password=password,
            )
        )
        logs = json_logs(settings)
        async with running(settings) as service:
            fake.reply_next(1, 451, f"4.3.0 try later, you sent AUTH PLAIN {plain} for <{EMAIL}>")
            # 451 is throttling: it spends no attempt, the row waits and then goes out
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "sent"
            fake.reply_next(1, 554, f"5.7.1 rejected: password={password} <{EMAIL}>")
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "failed"
            fake.slow_next(1, 3.0)
            assert (await deliver(conn, service, "email", EMAIL))["status"] == "dead"
            fake.rcpt_replies[other] = f"550 5.1.1 <{other}>: no such user (AUTH LOGIN {login})"
            assert (await deliver(conn, service, "email", other))["status"] == "failed"
            found = await outputs(conn, service)
        found["logs"] = logs.getvalue()
        found["captured logs"] = logs.captured()
        assert fake.auth_attempts and all(ok for _, ok in fake.auth_attempts)

    secrets = canaries(
        password, WEBHOOK_SECRET, UNSUBSCRIBE_SECRET, DB_PASSWORD, pairs=((user, password),)
    )
    secrets.update({plain: "AUTH PLAIN", login: "AUTH LOGIN", other: "a recipient"})
    assert_no_leak(found, secrets)
    assert "smtp_550" in found["events.error_code"]
    assert all(CODE.fullmatch(code) for code in await error_codes(conn))


# --- 6. a delivery report that quotes the address and a key --------------------------------------


async def test_inbound_bounce_report_is_stored_scrubbed(
    conn: asyncpg.Connection,
    dsn: str,
    resend: FakeResend,
    worker_settings: Callable[..., Settings],
    json_logs: Callable[[Settings], Logs],
) -> None:
    webhook_secret = "whsec_" + base64.b64encode(b"CANARYresendWEBHOOK-0123456789").decode()
    settings = worker_settings(
        **base_settings(
            dsn,
            email_providers="resend",
            resend_api_key=RESEND_KEY,
            resend_base_url=resend.url,
            resend_webhook_secret=webhook_secret,
        )
    )
    logs = json_logs(settings)
    async with running(settings) as service:
        row = await deliver(conn, service, "email", EMAIL)
        assert row["status"] == "sent"
        bounce = {
            "type": "Permanent",
            "subType": "General",
            "message": f"550 5.1.1 <{EMAIL}> unknown; request had Authorization: Bearer "
            f"{RESEND_KEY}",
        }
        body = json.dumps(resend_event("email.bounced", row["provider_message_id"], bounce=bounce))
        url = f"http://127.0.0.1:{service.http_port}/webhooks/resend"
        status, _ = await post_webhook(
            url, body.encode(), svix_headers(webhook_secret, body.encode())
        )
        assert status == 200
        found = await outputs(conn, service)
    found["logs"] = logs.getvalue()
    found["captured logs"] = logs.captured()

    assert "Permanent" in found["events.detail"]  # the report was stored, scrubbed
    assert_no_leak(
        found, canaries(RESEND_KEY, webhook_secret, WEBHOOK_SECRET, UNSUBSCRIBE_SECRET, DB_PASSWORD)
    )
