"""Email, SMS and push providers against the fake provider servers (real HTTP and SMTP on
127.0.0.1), one provider object at a time, then through the Dispatcher: circuit breaker,
failover, rate limit, and no secret in any log line or outcome.

What every HTTP provider shares (5xx, 429 and its reset header, timeouts, the circuit opening,
no secret in logs) is checked once for all in test_provider_contract.py; this file keeps what is
particular to each provider."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from pgnotify_worker.adapters.providers.fcm import FcmProvider
from pgnotify_worker.adapters.providers.google_auth import GOOGLE_TOKEN_AUDIENCE
from pgnotify_worker.adapters.providers.resend import ResendProvider
from pgnotify_worker.adapters.providers.sendgrid import SendGridProvider
from pgnotify_worker.adapters.providers.smtp import Security, SmtpProvider
from pgnotify_worker.adapters.providers.twilio import TwilioProvider
from pgnotify_worker.adapters.providers.webhook import WebhookProvider
from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.state import Status, resolve
from pgnotify_worker.delivery.failover import ChannelProviders, ProviderSlot
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import (
    Permanent,
    RenderedMessage,
    Retryable,
    Sent,
)
from pgnotify_worker.ports import Provider
from tests.fakes.base import bearer_token
from tests.fakes.fcm import JWT_BEARER, FakeFCM, b64url_decode, make_service_account
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.smtp import FakeSMTP, TlsMode
from tests.fakes.twilio import FakeTwilio, basic_credentials
from tests.support.providers import (
    FakeClock,
    assert_no_canary,
    assert_retryable,
    encodings,
    make_dispatcher,
    notification,
)

SENDER = "Acme <no-reply@acme.test>"
RESEND_KEY = "re_test_resend_key_123"
SENDGRID_KEY = "SG.test-sendgrid-key.abc"
TWILIO_SID = "AC" + "5" * 32
TWILIO_TOKEN = "twilio-auth-token-0123456789"
TWILIO_FROM = "+15005550006"
SMTP_USER = "mailer"
SMTP_PASSWORD = "smtp-password-0123"
CREATED = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.UTC)


def message(
    recipient: str = "ada@example.com", channel: str = "email", **overrides: Any
) -> RenderedMessage:
    """A rendered message with its own idempotency key."""
    values: dict[str, Any] = {
        "notification_id": 42,
        "idempotency_key": f"pgn_{uuid.uuid4()}",
        "channel": channel,
        "recipient": recipient,
        "subject": "Your order shipped",
        "text": "Order 7 is on its way.",
        "html": "<p>Order <b>7</b> is on its way.</p>",
        "data": {},
        "created_at": CREATED,
    }
    values.update(overrides)
    return RenderedMessage(**values)


def sms(recipient: str = "+14155552671", **overrides: Any) -> RenderedMessage:
    return message(
        recipient, "sms", subject=None, html=None, text="Your code is 123456", **overrides
    )


def push(token: str = "device-token-1", **overrides: Any) -> RenderedMessage:
    return message(token, "push", html=None, **overrides)


P = TypeVar("P", bound=Provider)


async def started(provider: P) -> P:
    await provider.start()
    return provider


# --- fakes and providers --------------------------------------------------------------------------


@pytest.fixture
async def resend_fake() -> AsyncIterator[FakeResend]:
    async with FakeResend(RESEND_KEY) as fake:
        yield fake


@pytest.fixture
async def sendgrid_fake() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid(SENDGRID_KEY) as fake:
        yield fake


@pytest.fixture
async def twilio_fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(TWILIO_SID, TWILIO_TOKEN) as fake:
        yield fake


@pytest.fixture
async def fcm_fake() -> AsyncIterator[FakeFCM]:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def smtp_fake() -> AsyncIterator[FakeSMTP]:
    async with FakeSMTP() as fake:
        yield fake


@pytest.fixture
async def resend(resend_fake: FakeResend) -> AsyncIterator[ResendProvider]:
    provider = await started(ResendProvider(RESEND_KEY, SENDER, base_url=resend_fake.url))
    yield provider
    await provider.close()


@pytest.fixture
async def sendgrid(sendgrid_fake: FakeSendGrid) -> AsyncIterator[SendGridProvider]:
    provider = await started(SendGridProvider(SENDGRID_KEY, SENDER, base_url=sendgrid_fake.url))
    yield provider
    await provider.close()


def twilio_provider(fake: FakeTwilio, **overrides: Any) -> TwilioProvider:
    values: dict[str, Any] = {"sender": TWILIO_FROM, "base_url": fake.url}
    values.update(overrides)
    sid = values.pop("account_sid", TWILIO_SID)
    token = values.pop("auth_token", TWILIO_TOKEN)
    return TwilioProvider(sid, token, **values)


@pytest.fixture
async def twilio(twilio_fake: FakeTwilio) -> AsyncIterator[TwilioProvider]:
    provider = await started(twilio_provider(twilio_fake))
    yield provider
    await provider.close()


def fcm_account(fake: FakeFCM) -> str:
    assert fake.service_account is not None
    return json.dumps(fake.service_account)


@pytest.fixture
async def fcm(fcm_fake: FakeFCM) -> AsyncIterator[FcmProvider]:
    provider = await started(FcmProvider(fcm_account(fcm_fake), base_url=fcm_fake.url))
    yield provider
    await provider.close()


@pytest.fixture
async def smtp(smtp_fake: FakeSMTP) -> AsyncIterator[SmtpProvider]:
    provider = await started(
        SmtpProvider(smtp_fake.host, SENDER, port=smtp_fake.port, security="none")
    )
    yield provider
    await provider.close()


# --- Resend ----------------------------------------------------------------------------------------


async def test_resend_sends_the_documented_request(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    msg = message(unsubscribe_url="https://acme.test/unsubscribe?u=7", category="orders")
    outcome = await resend.send(msg)

    assert outcome == Sent(resend_fake.sent_ids[0])
    (request,) = resend_fake.requests
    assert (request.method, request.path) == ("POST", "/emails")
    assert request.header("authorization") == f"Bearer {RESEND_KEY}"
    assert request.header("idempotency-key") == msg.idempotency_key
    assert request.header("content-type") == "application/json"
    assert (request.header("user-agent") or "").startswith("pgnotify-worker/")
    assert request.json == {
        "from": SENDER,
        "to": ["ada@example.com"],
        "subject": "Your order shipped",
        "text": "Order 7 is on its way.",
        "html": "<p>Order <b>7</b> is on its way.</p>",
        "tags": [{"name": "notification_id", "value": "42"}],
        "headers": {
            "List-Unsubscribe": "<https://acme.test/unsubscribe?u=7>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    }


@pytest.mark.parametrize("url", [None, "http://acme.test/unsubscribe", "mailto:off@acme.test"])
async def test_resend_adds_one_click_unsubscribe_only_for_https(
    resend: ResendProvider, resend_fake: FakeResend, url: str | None
) -> None:
    assert isinstance(await resend.send(message(unsubscribe_url=url)), Sent)
    assert "headers" not in resend_fake.sent[0]


async def test_resend_retry_reuses_the_idempotency_key_and_sends_one_email(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    msg = message()
    resend_fake.fail_next(1, status=503)
    assert_retryable(await resend.send(msg), "http_503")
    again = await resend.send(msg)
    replay = await resend.send(msg)  # a duplicate after success: Resend answers with the same id

    assert again == replay == Sent(resend_fake.sent_ids[0])
    keys = {r.header("idempotency-key") for r in resend_fake.requests}
    assert keys == {msg.idempotency_key}
    assert len(resend_fake.requests) == 3
    assert len(resend_fake.sent) == 1


async def test_resend_422_validation_error_is_permanent(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    outcome = await resend.send(message("not-an-email"))
    assert isinstance(outcome, Permanent), outcome
    assert outcome.code == "resend_validation_error"
    assert "Invalid `to` field" in outcome.message
    assert outcome.suppress is None
    assert resend_fake.sent == []


async def test_resend_wrong_api_key_trips(resend_fake: FakeResend) -> None:
    provider = await started(ResendProvider("re_wrong_key", SENDER, base_url=resend_fake.url))
    try:
        assert_retryable(await provider.send(message()), "resend_invalid_api_key", trip=True)
    finally:
        await provider.close()


async def test_resend_spent_quota_trips(resend: ResendProvider, resend_fake: FakeResend) -> None:
    resend_fake.quota_exceeded_next(1)
    assert_retryable(await resend.send(message()), "resend_daily_quota_exceeded", trip=True)


# --- SendGrid --------------------------------------------------------------------------------------


async def test_sendgrid_sends_the_documented_request(
    sendgrid: SendGridProvider, sendgrid_fake: FakeSendGrid
) -> None:
    msg = message(unsubscribe_url="https://acme.test/u/7", category="orders")
    outcome = await sendgrid.send(msg)

    assert outcome == Sent(sendgrid_fake.message_ids[0])
    (request,) = sendgrid_fake.requests
    assert (request.method, request.path) == ("POST", "/v3/mail/send")
    assert request.header("authorization") == f"Bearer {SENDGRID_KEY}"
    body = request.json
    assert body["personalizations"] == [
        {
            "to": [{"email": "ada@example.com"}],
            "custom_args": {"notification_id": "42", "idempotency_key": msg.idempotency_key},
        }
    ]
    assert body["from"] == {"email": "no-reply@acme.test", "name": "Acme"}
    assert body["subject"] == "Your order shipped"
    assert body["content"] == [
        {"type": "text/plain", "value": "Order 7 is on its way."},
        {"type": "text/html", "value": "<p>Order <b>7</b> is on its way.</p>"},
    ]
    assert body["headers"] == {
        "List-Unsubscribe": "<https://acme.test/u/7>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert body["categories"] == ["orders"]


async def test_sendgrid_html_only_and_text_only_bodies(
    sendgrid: SendGridProvider, sendgrid_fake: FakeSendGrid
) -> None:
    assert isinstance(await sendgrid.send(message(text=None)), Sent)
    assert isinstance(await sendgrid.send(message(html=None)), Sent)
    assert [b["content"][0]["type"] for b in sendgrid_fake.sent] == ["text/html", "text/plain"]


async def test_sendgrid_400_is_permanent(
    sendgrid: SendGridProvider, sendgrid_fake: FakeSendGrid
) -> None:
    outcome = await sendgrid.send(message("not-an-email"))
    assert isinstance(outcome, Permanent), outcome
    assert outcome.code == "sendgrid_400"
    assert "to array must at least have an email" in outcome.message
    assert sendgrid_fake.sent == []


async def test_sendgrid_wrong_api_key_trips(sendgrid_fake: FakeSendGrid) -> None:
    provider = await started(SendGridProvider("SG.wrong", SENDER, base_url=sendgrid_fake.url))
    try:
        assert_retryable(await provider.send(message()), "sendgrid_401", trip=True)
    finally:
        await provider.close()


# --- SMTP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("security", "fake_tls"), [("none", "none"), ("starttls", "starttls"), ("tls", "implicit")]
)
async def test_smtp_sends_multipart_with_stable_headers(
    security: Security, fake_tls: TlsMode, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    async with FakeSMTP(username=SMTP_USER, password=SMTP_PASSWORD, tls=fake_tls) as fake:
        ca_file.write_bytes(fake.ca_pem)
        provider = await started(
            SmtpProvider(
                fake.host,
                SENDER,
                port=fake.port,
                security=security,
                username=SMTP_USER,
                password=SMTP_PASSWORD,
                ca_file=ca_file,
            )
        )
        try:
            msg = message(unsubscribe_url="https://acme.test/unsubscribe?u=7")
            outcome = await provider.send(msg)
            (received,) = await fake.wait_for(1)
        finally:
            await provider.close()

    message_id = f"<{msg.idempotency_key}@acme.test>"
    assert outcome == Sent(message_id)
    assert (received.mail_from, received.rcpt_tos) == ("no-reply@acme.test", ["ada@example.com"])
    assert received.tls is (security != "none")
    assert received.auth_user == SMTP_USER
    email_ = received.message
    assert email_["From"] == SENDER
    assert email_["To"] == "ada@example.com"
    assert email_["Subject"] == "Your order shipped"
    assert email_["Message-ID"] == message_id
    assert email.utils.parsedate_to_datetime(email_["Date"]) == CREATED
    assert email_["List-Unsubscribe"] == "<https://acme.test/unsubscribe?u=7>"
    assert email_["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert email_.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().strip()) for p in email_.iter_parts()]
    assert parts == [
        ("text/plain", "Order 7 is on its way."),
        ("text/html", "<p>Order <b>7</b> is on its way.</p>"),
    ]


async def test_smtp_message_id_is_stable_across_attempts(
    smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    msg = message()
    smtp_fake.reply_next(1, 451, "4.3.0 Try again later")
    assert isinstance(await smtp.send(msg), Retryable)
    assert await smtp.send(msg) == Sent(f"<{msg.idempotency_key}@acme.test>")
    ids = [a.message["Message-ID"] for a in await smtp_fake.wait_for_attempts(2)]
    assert ids == [f"<{msg.idempotency_key}@acme.test>"] * 2


async def test_smtp_without_unsubscribe_url_has_no_list_headers(
    smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    assert isinstance(await smtp.send(message(html=None)), Sent)
    (received,) = await smtp_fake.wait_for(1)
    assert received.message["List-Unsubscribe"] is None
    assert received.message.get_content_type() == "text/plain"


async def test_smtp_without_created_at_has_no_empty_date_header(
    smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    assert isinstance(await smtp.send(message(created_at=None)), Sent)
    (received,) = await smtp_fake.wait_for(1)
    date = received.message["Date"]
    assert date is None or email.utils.parsedate_to_datetime(str(date)) is not None


async def test_smtp_rcpt_550_no_such_user_is_permanent_and_suppresses(
    smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    smtp_fake.rcpt_replies["gone@example.com"] = "550 5.1.1 <gone@example.com>: User unknown"
    outcome = await smtp.send(message("gone@example.com"))
    assert isinstance(outcome, Permanent), outcome
    assert (outcome.code, outcome.suppress) == ("smtp_550", "hard_bounce")
    # the connection is reset and reused: the next message goes through
    assert isinstance(await smtp.send(message()), Sent)
    assert [m.rcpt_tos for m in await smtp_fake.wait_for(1)] == [["ada@example.com"]]


async def test_smtp_data_550_5_1_1_suppresses_but_a_policy_554_does_not(
    smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    smtp_fake.reply_next(1, 550, "5.1.1 Mailbox does not exist")
    smtp_fake.reply_next(1, 554, "5.7.1 Message rejected as spam")
    bounced = await smtp.send(message())
    rejected = await smtp.send(message())
    assert isinstance(bounced, Permanent) and bounced.suppress == "hard_bounce", bounced
    assert isinstance(rejected, Permanent) and rejected.suppress is None, rejected
    assert rejected.code == "smtp_554"
    assert smtp_fake.messages == []


async def test_smtp_451_is_retryable(smtp: SmtpProvider, smtp_fake: FakeSMTP) -> None:
    smtp_fake.reply_next(1, 451, "4.7.1 Greylisted, try again")
    outcome = await smtp.send(message())
    assert isinstance(outcome, Retryable), outcome
    assert outcome.code == "smtp_451" and not outcome.trip


@pytest.mark.parametrize("password", ["wrong-password", None])
async def test_smtp_bad_or_missing_credentials_trip(password: str | None) -> None:
    async with FakeSMTP(username=SMTP_USER, password=SMTP_PASSWORD) as fake:
        provider = await started(
            SmtpProvider(
                fake.host,
                SENDER,
                port=fake.port,
                security="none",
                username=SMTP_USER if password else None,
                password=password,
            )
        )
        try:
            outcome = await provider.send(message())
        finally:
            await provider.close()
        assert fake.messages == []
    assert isinstance(outcome, Retryable), outcome
    assert outcome.trip
    assert outcome.code == ("smtp_535" if password else "smtp_530")


async def test_smtp_unreachable_server_is_retryable(smtp_fake: FakeSMTP) -> None:
    port = smtp_fake.port
    await smtp_fake.stop()
    provider = await started(SmtpProvider("127.0.0.1", SENDER, port=port, security="none"))
    outcome = await provider.send(message())
    await provider.close()
    assert isinstance(outcome, Retryable), outcome
    assert not outcome.trip


async def test_smtp_slow_server_is_retryable(smtp_fake: FakeSMTP) -> None:
    provider = await started(
        SmtpProvider(smtp_fake.host, SENDER, port=smtp_fake.port, security="none", timeout=0.3)
    )
    smtp_fake.slow_next(1, 1.0)
    started_at = time.monotonic()
    outcome = await provider.send(message())
    await provider.close()
    assert isinstance(outcome, Retryable), outcome
    assert not outcome.trip
    assert time.monotonic() - started_at < 1.0


async def test_smtp_slow_server_is_a_timeout(smtp_fake: FakeSMTP) -> None:
    provider = await started(
        SmtpProvider(smtp_fake.host, SENDER, port=smtp_fake.port, security="none", timeout=0.3)
    )
    smtp_fake.slow_next(1, 1.0)
    outcome = await provider.send(message())
    await provider.close()
    assert_retryable(outcome, "timeout")


# --- Twilio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "number", "e164"),
    [
        ("US", "(415) 555-2671", "+14155552671"),
        ("US", "+14155552671", "+14155552671"),
        ("GB", "07911 123456", "+447911123456"),
    ],
)
async def test_twilio_sends_e164_with_basic_auth(
    twilio_fake: FakeTwilio, region: str, number: str, e164: str
) -> None:
    callback = "https://notify.acme.test/webhooks/twilio"
    provider = await started(twilio_provider(twilio_fake, region=region, status_callback=callback))
    try:
        outcome = await provider.send(sms(number))
    finally:
        await provider.close()

    (resource,) = twilio_fake.sent
    assert outcome == Sent(resource["sid"])
    assert resource["sid"].startswith("SM")
    (request,) = twilio_fake.requests
    assert request.path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    assert basic_credentials(request.header("authorization")) == (TWILIO_SID, TWILIO_TOKEN)
    assert request.form == {
        "To": e164,
        "From": TWILIO_FROM,
        "Body": "Your code is 123456",
        "StatusCallback": callback,
    }


async def test_twilio_uses_the_messaging_service_instead_of_from(twilio_fake: FakeTwilio) -> None:
    service = "MG" + "1" * 32
    provider = await started(twilio_provider(twilio_fake, messaging_service_sid=service))
    try:
        assert isinstance(await provider.send(sms()), Sent)
    finally:
        await provider.close()
    (request,) = twilio_fake.requests
    assert request.form is not None
    assert request.form["MessagingServiceSid"] == service
    assert "From" not in request.form


@pytest.mark.parametrize("number", ["12", "not a number", "+1 415 555"])
async def test_twilio_invalid_number_never_reaches_twilio(
    twilio: TwilioProvider, twilio_fake: FakeTwilio, number: str
) -> None:
    outcome = await twilio.send(sms(number))
    assert isinstance(outcome, Permanent), outcome
    assert outcome.code == "invalid_number"
    assert twilio_fake.requests == []


@pytest.mark.parametrize(
    ("code", "suppress"),
    [(21211, "invalid_number"), (21614, "invalid_number"), (21610, "unsubscribed")],
)
async def test_twilio_dead_numbers_are_permanent_and_suppressed(
    twilio: TwilioProvider, twilio_fake: FakeTwilio, code: int, suppress: str
) -> None:
    twilio_fake.error_for_number["+14155552671"] = code
    outcome = await twilio.send(sms())
    assert isinstance(outcome, Permanent), outcome
    assert (outcome.code, outcome.suppress) == (f"twilio_{code}", suppress)
    assert twilio_fake.sent == []


async def test_twilio_wrong_auth_token_trips(twilio_fake: FakeTwilio) -> None:
    provider = await started(twilio_provider(twilio_fake, auth_token="wrong-token"))
    try:
        assert_retryable(await provider.send(sms()), "twilio_20003", trip=True)
    finally:
        await provider.close()


# --- FCM -------------------------------------------------------------------------------------------


async def test_fcm_gets_a_token_with_a_signed_assertion_and_sends(
    fcm: FcmProvider, fcm_fake: FakeFCM
) -> None:
    data = {
        "order": 7,
        "tags": ["a", "b"],
        "paid": True,
        "name": "Ada",
        "from": "reserved",
        "message_type": "reserved",
        "google.x": "reserved",
        "gcm.y": "reserved",
    }
    outcome = await fcm.send(
        push("device-token-1", subject="Shipped", text="On its way", data=data)
    )
    second = await fcm.send(push("device-token-2"))

    # the grant: a JWT signed with the service account's key, as Google requires it
    (grant,) = fcm_fake.token_requests  # one token serves both sends
    assert grant.form is not None and grant.form["grant_type"] == JWT_BEARER
    head_b64, claims_b64, signature_b64 = grant.form["assertion"].split(".")
    assert fcm_fake.private_key is not None and fcm_fake.service_account is not None
    fcm_fake.private_key.public_key().verify(
        b64url_decode(signature_b64),
        f"{head_b64}.{claims_b64}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    header = json.loads(b64url_decode(head_b64))
    claims = json.loads(b64url_decode(claims_b64))
    assert header == {
        "alg": "RS256",
        "typ": "JWT",
        "kid": fcm_fake.service_account["private_key_id"],
    }
    assert claims["iss"] == fcm_fake.service_account["client_email"]
    assert claims["aud"] == GOOGLE_TOKEN_AUDIENCE
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60

    # the send: the issued token, the message with string-only data
    first_request, second_request = fcm_fake.requests
    assert first_request.path == fcm_fake.send_path
    assert bearer_token(first_request) in fcm_fake.issued
    assert bearer_token(second_request) == bearer_token(first_request)
    assert first_request.json == {
        "message": {
            "token": "device-token-1",
            "notification": {"title": "Shipped", "body": "On its way"},
            "data": {"order": "7", "tags": '["a","b"]', "paid": "true", "name": "Ada"},
        }
    }
    assert isinstance(outcome, Sent) and isinstance(second, Sent)
    assert outcome.provider_message_id is not None
    assert outcome.provider_message_id.startswith("projects/demo-project/messages/")
    assert len(fcm_fake.sent) == 2


async def test_fcm_refreshes_an_expired_token_once(fcm: FcmProvider, fcm_fake: FakeFCM) -> None:
    assert isinstance(await fcm.send(push()), Sent)
    fcm_fake.expire_tokens()
    outcome = await fcm.send(push())

    assert isinstance(outcome, Sent), outcome
    assert len(fcm_fake.token_requests) == 2
    first, refused, retried = fcm_fake.requests
    assert bearer_token(refused) == bearer_token(first)
    assert bearer_token(retried) != bearer_token(first)
    assert len(fcm_fake.sent) == 2


async def test_fcm_refused_grant_trips_and_sends_nothing(
    fcm: FcmProvider, fcm_fake: FakeFCM
) -> None:
    fcm_fake.token_error_next(1, status=400, error="invalid_grant", description="Invalid JWT.")
    outcome = assert_retryable(await fcm.send(push()), "fcm_token", trip=True)
    assert "invalid_grant" in outcome.message
    assert fcm_fake.requests == []


async def test_fcm_token_endpoint_outage_is_retryable_without_trip(
    fcm: FcmProvider, fcm_fake: FakeFCM
) -> None:
    fcm_fake.token_error_next(1, status=503, error="unavailable")
    assert_retryable(await fcm.send(push()), "fcm_token")


async def test_fcm_key_the_project_does_not_trust_trips(fcm_fake: FakeFCM) -> None:
    assert fcm_fake.service_account is not None
    stranger, _ = make_service_account(
        fcm_fake.token_uri, "demo-project", client_email=fcm_fake.service_account["client_email"]
    )
    provider = await started(FcmProvider(json.dumps(stranger), base_url=fcm_fake.url))
    try:
        assert_retryable(await provider.send(push()), "fcm_token", trip=True)
    finally:
        await provider.close()
    assert fcm_fake.requests == []


async def test_fcm_unregistered_token_is_permanent_and_deactivates(
    fcm: FcmProvider, fcm_fake: FakeFCM
) -> None:
    fcm_fake.unregistered.add("dead-token")
    outcome = await fcm.send(push("dead-token"))
    assert isinstance(outcome, Permanent), outcome
    assert (outcome.code, outcome.deactivate) == ("fcm_UNREGISTERED", True)


async def test_fcm_third_party_auth_error_trips(fcm: FcmProvider, fcm_fake: FakeFCM) -> None:
    fcm_fake.fcm_error_next(1, 401, "THIRD_PARTY_AUTH_ERROR")
    assert_retryable(await fcm.send(push()), "fcm_THIRD_PARTY_AUTH_ERROR", trip=True)
    assert len(fcm_fake.token_requests) == 1  # an APNs problem: no token refresh


@pytest.mark.parametrize(("retry_after", "expected"), [(90, 90.0), (None, 60.0)])
async def test_fcm_quota_exceeded_is_throttled(
    fcm: FcmProvider, fcm_fake: FakeFCM, retry_after: int | None, expected: float
) -> None:
    fcm_fake.fcm_error_next(1, 429, "QUOTA_EXCEEDED", retry_after=retry_after)
    outcome = assert_retryable(await fcm.send(push()), "fcm_QUOTA_EXCEEDED", throttled=True)
    assert outcome.retry_after == expected


# --- missing configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "variable"),
    [
        (lambda: ResendProvider(None, SENDER), "PGNOTIFY_RESEND_API_KEY"),
        (lambda: ResendProvider("", SENDER), "PGNOTIFY_RESEND_API_KEY"),
        (lambda: ResendProvider(RESEND_KEY, None), "PGNOTIFY_EMAIL_FROM"),
        (lambda: ResendProvider(RESEND_KEY, "nobody"), "PGNOTIFY_EMAIL_FROM"),
        (lambda: SendGridProvider(None, SENDER), "PGNOTIFY_SENDGRID_API_KEY"),
        (lambda: SendGridProvider(SENDGRID_KEY, None), "PGNOTIFY_EMAIL_FROM"),
        (lambda: SmtpProvider(None, SENDER), "PGNOTIFY_SMTP_HOST"),
        (lambda: SmtpProvider("127.0.0.1", None), "PGNOTIFY_EMAIL_FROM"),
        (
            lambda: TwilioProvider(None, TWILIO_TOKEN, sender=TWILIO_FROM),
            "PGNOTIFY_TWILIO_ACCOUNT_SID",
        ),
        (
            lambda: TwilioProvider(TWILIO_SID, None, sender=TWILIO_FROM),
            "PGNOTIFY_TWILIO_AUTH_TOKEN",
        ),
        (lambda: TwilioProvider(TWILIO_SID, TWILIO_TOKEN), "PGNOTIFY_TWILIO_FROM"),
        (lambda: FcmProvider(None), "PGNOTIFY_FCM_SERVICE_ACCOUNT"),
        (lambda: FcmProvider('{"project_id": "p"}'), "PGNOTIFY_FCM_SERVICE_ACCOUNT"),
        (lambda: FcmProvider("/nonexistent/key.json"), "PGNOTIFY_FCM_SERVICE_ACCOUNT"),
    ],
)
def test_missing_configuration_names_the_variable(
    build: Callable[[], object], variable: str
) -> None:
    with pytest.raises(ProviderConfigError, match=variable):
        build()


# --- through the Dispatcher: circuit, failover, rate limit ----------------------------------------


def slot(provider: Provider, threshold: int = 5, open_seconds: float = 30.0) -> ProviderSlot:
    return ProviderSlot(
        provider, CircuitBreaker(threshold=threshold, open_seconds=open_seconds), None
    )


async def test_circuit_opens_after_failures_then_one_probe_closes_it(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    resend_slot = slot(resend, threshold=3, open_seconds=30.0)
    dispatcher = make_dispatcher(
        {"email": ChannelProviders("email", [resend_slot])},
        clock,
        on_circuit=lambda name, breaker: changes.append((name, breaker.state.value)),
    )
    resend_fake.fail_next(3, status=503)

    for _ in range(3):
        assert dispatcher.capacity("email", 10) == 10
        outcome, provider = await dispatcher.send_chain("email", message())
        assert provider == "resend"
        assert_retryable(outcome, "http_503")
    assert resend_slot.breaker.state is CircuitState.OPEN
    assert changes == [("resend", "open")]

    # open: nothing is claimed, and a send that still comes is not passed on
    assert dispatcher.capacity("email", 10) == 0
    assert dispatcher.blocked_for("email") == 30.0
    outcome, provider = await dispatcher.send_chain("email", message())
    assert provider == "none"
    paused = assert_retryable(outcome, "circuit_open")
    assert paused.retry_after == 30.0
    assert "resend answered HTTP 503" in paused.message
    assert len(resend_fake.requests) == 3
    # nothing reached a provider: the row waits, its attempt refunded, never dead for it
    assert not paused.tried
    waiting = resolve(paused, attempt=10, max_attempts=10, policy=RetryPolicy(), rand=0.5)
    assert (waiting.status, waiting.refund) == (Status.SCHEDULED, True)

    clock.now += 29.9
    assert dispatcher.capacity("email", 10) == 0
    clock.now += 0.2
    assert dispatcher.capacity("email", 10) == 1  # one probe

    outcome, provider = await dispatcher.send_chain("email", message())
    assert isinstance(outcome, Sent) and provider == "resend"
    assert resend_slot.breaker.state is CircuitState.CLOSED
    assert dispatcher.capacity("email", 10) == 10
    assert len(resend_fake.requests) == 4
    assert changes[-1] == ("resend", "closed")


async def test_a_failed_probe_reopens_the_circuit(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    clock = FakeClock()
    resend_slot = slot(resend, threshold=1, open_seconds=10.0)
    dispatcher = make_dispatcher({"email": ChannelProviders("email", [resend_slot])}, clock)
    resend_fake.fail_next(2, status=503)
    await dispatcher.send_chain("email", message())
    clock.now += 10.0
    assert dispatcher.capacity("email", 5) == 1
    outcome, _ = await dispatcher.send_chain("email", message())

    assert_retryable(outcome, "http_503")
    assert resend_slot.breaker.state is CircuitState.OPEN
    assert dispatcher.capacity("email", 5) == 0
    assert dispatcher.blocked_for("email") == 10.0  # the wait starts again at the failed probe
    assert len(resend_fake.requests) == 2


async def test_the_half_open_probe_is_reported(
    resend: ResendProvider, resend_fake: FakeResend
) -> None:
    clock = FakeClock()
    changes: list[str] = []
    dispatcher = make_dispatcher(
        {"email": ChannelProviders("email", [slot(resend, threshold=1, open_seconds=5.0)])},
        clock,
        on_circuit=lambda _name, breaker: changes.append(breaker.state.value),
    )
    resend_fake.fail_next(1, status=503)
    await dispatcher.send_chain("email", message())
    clock.now += 5.0
    await dispatcher.send_chain("email", message())
    assert changes == ["open", "half_open", "closed"]


async def test_failover_to_smtp_when_resend_fails(
    resend: ResendProvider, resend_fake: FakeResend, smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    failovers: list[tuple[str, str]] = []
    dispatcher = make_dispatcher(
        {"email": ChannelProviders("email", [slot(resend), slot(smtp)])},
        on_failover=lambda channel, provider: failovers.append((channel, provider)),
    )
    resend_fake.fail_next(5, status=503)
    msg = message()
    outcome, provider = await dispatcher.send_chain("email", msg)

    assert (outcome, provider) == (Sent(f"<{msg.idempotency_key}@acme.test>"), "smtp")
    assert failovers == [("email", "smtp")]
    assert len(resend_fake.requests) == 1
    (received,) = await smtp_fake.wait_for(1)
    assert received.message["Message-ID"] == f"<{msg.idempotency_key}@acme.test>"


async def test_failover_to_sendgrid_and_back_when_resend_answers(
    resend: ResendProvider,
    resend_fake: FakeResend,
    sendgrid: SendGridProvider,
    sendgrid_fake: FakeSendGrid,
) -> None:
    dispatcher = make_dispatcher(
        {"email": ChannelProviders("email", [slot(resend), slot(sendgrid)])}
    )
    resend_fake.fail_next(1, status=500)
    assert (await dispatcher.send_chain("email", message()))[1] == "sendgrid"
    assert (await dispatcher.send_chain("email", message()))[1] == "resend"
    assert (len(resend_fake.sent), len(sendgrid_fake.sent)) == (1, 1)


async def test_a_permanent_answer_does_not_fail_over(
    resend: ResendProvider, smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    dispatcher = make_dispatcher({"email": ChannelProviders("email", [slot(resend), slot(smtp)])})
    outcome, provider = await dispatcher.send_chain("email", message("not-an-email"))
    assert isinstance(outcome, Permanent) and provider == "resend"
    assert smtp_fake.attempts == []


async def test_bad_credentials_trip_at_once_and_fail_over(
    resend_fake: FakeResend, smtp: SmtpProvider, smtp_fake: FakeSMTP
) -> None:
    resend = await started(ResendProvider("re_revoked", SENDER, base_url=resend_fake.url))
    resend_slot = slot(resend, threshold=5)
    dispatcher = make_dispatcher({"email": ChannelProviders("email", [resend_slot, slot(smtp)])})
    try:
        first = await dispatcher.send_chain("email", message())
        assert resend_slot.breaker.state is CircuitState.OPEN  # one failure, threshold 5
        second = await dispatcher.send_chain("email", message())
    finally:
        await resend.close()

    assert [provider for _, provider in (first, second)] == ["smtp", "smtp"]
    assert all(isinstance(outcome, Sent) for outcome, _ in (first, second))
    assert len(resend_fake.requests) == 1  # the paused provider is skipped
    assert len(await smtp_fake.wait_for(2)) == 2
    assert dispatcher.capacity("email", 7) == 7  # smtp still takes everything


# --- secrets never show up ------------------------------------------------------------------------


async def fail_through_dispatcher(
    provider: Provider, channel: str, recipient: str, rounds: int
) -> list[object]:
    """Send `rounds` notifications to a failing provider, directly and through a Dispatcher
    (threshold 1, so the circuit logs too); returns the outcomes and the deliveries (what is
    written to the row: last_error, error_code)."""
    breaker_slot = slot(provider, threshold=1, open_seconds=0.001)
    dispatcher = make_dispatcher({channel: ChannelProviders(channel, [breaker_slot])})
    shown: list[object] = []
    for _ in range(rounds):
        n = notification(channel, recipient)
        message_, _ = await dispatcher.render(n)
        shown.append(await provider.send(message_))
        breaker_slot.breaker.success()
        delivery = await dispatcher.deliver(n)
        assert delivery.outcome in ("dead", "failed"), delivery
        assert delivery.completion.error is not None
        shown.append(delivery)
    return shown


async def test_no_secret_in_logs_or_outcomes_smtp(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "CANARY-smtp-9c4d1e"
    async with FakeSMTP(username=SMTP_USER, password="the-real-one") as fake:
        provider = await started(
            SmtpProvider(
                fake.host,
                SENDER,
                port=fake.port,
                security="none",
                username=SMTP_USER,
                password=canary,
            )
        )
        try:
            outcomes = await fail_through_dispatcher(provider, "email", "ada@example.com", 2)
        finally:
            await provider.close()
        assert fake.auth_attempts and not any(ok for _, ok in fake.auth_attempts)
    assert all(isinstance(o, Retryable) for o in outcomes[::2])
    assert_no_canary(caplog, outcomes, encodings(SMTP_USER, canary))


async def test_no_secret_in_logs_or_outcomes_fcm(
    caplog: pytest.LogCaptureFixture, fcm_fake: FakeFCM
) -> None:
    caplog.set_level(logging.DEBUG)
    assert fcm_fake.service_account is not None
    stranger, _ = make_service_account(
        fcm_fake.token_uri, "demo-project", client_email=fcm_fake.service_account["client_email"]
    )
    untrusted = await started(FcmProvider(json.dumps(stranger), base_url=fcm_fake.url))
    trusted = await started(FcmProvider(fcm_account(fcm_fake), base_url=fcm_fake.url))
    try:
        outcomes = await fail_through_dispatcher(untrusted, "push", "device-token-1", 2)
        fcm_fake.fcm_error_next(2, 401, "THIRD_PARTY_AUTH_ERROR")
        outcomes += await fail_through_dispatcher(trusted, "push", "device-token-1", 1)
        fcm_fake.fail_next(4, status=401)  # refused even after the refresh
        outcomes += await fail_through_dispatcher(trusted, "push", "device-token-1", 1)
    finally:
        await untrusted.close()
        await trusted.close()
    key_lines = [
        line
        for account in (stranger, fcm_fake.service_account)
        for line in account["private_key"].splitlines()
        if not line.startswith("-----")
    ]
    assert fcm_fake.issued, "no access token was issued: the scenario did not run"
    assert_no_canary(caplog, outcomes, [*key_lines, *fcm_fake.issued])


@pytest.mark.parametrize(
    ("text", "content_type"),
    [
        ('{"text": "Order 7 shipped"}', "application/json"),
        ('  [1, 2, {"a": null}]\n', "application/json"),
        ("Order 7 shipped", "text/plain; charset=utf-8"),
        ('{"text": "cut short', "text/plain; charset=utf-8"),  # looks like JSON, is not
        ('"a JSON string is sent as text"', "text/plain; charset=utf-8"),
        ("", "text/plain; charset=utf-8"),
    ],
)
def test_a_rendered_webhook_body_is_labelled_json_only_when_it_is_a_document(
    text: str, content_type: str
) -> None:
    provider = WebhookProvider("whsec_" + base64.b64encode(b"k" * 24).decode())
    message = RenderedMessage(
        1, "pgn_1", "webhook", "https://example.com/hook", None, text, None, {}
    )
    body, headers = provider.build(message, 1_700_000_000)
    assert body == text.encode()
    assert headers["Content-Type"] == content_type
