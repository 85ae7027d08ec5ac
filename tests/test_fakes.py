"""The fake provider servers speak each provider's documented wire format, and the signing
helpers reproduce the published test vectors (research: /work/research/*.md)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import aiosmtplib
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.fcm import FakeFCM, make_service_account, sign_assertion
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.smtp import FakeSMTP
from tests.fakes.twilio import FakeTwilio, basic_auth, num_segments, twilio_signature
from tests.fakes.webhook import FakeWebhookReceiver
from tests.fakes.webhooks_in import (
    SENDGRID_SIGNATURE,
    SENDGRID_TIMESTAMP,
    SendGridSigner,
    post_webhook,
    resend_event,
    sendgrid_event,
    svix_headers,
    verify_sendgrid,
)
from tests.support.webhooks import WebhookSink

pytestmark = pytest.mark.timeout(30)

UA = {"User-Agent": "pgnotify-worker-tests/1.0"}


async def call(
    method: str,
    url: str,
    *,
    timeout: float = 5.0,
    skip_auto_headers: tuple[str, ...] = (),
    **kwargs: Any,
) -> tuple[int, dict[str, str], bytes]:
    """One request with a fresh session: (status, headers lower-cased, body)."""
    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), skip_auto_headers=skip_auto_headers
        ) as session,
        session.request(method, url, **kwargs) as response,
    ):
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.read()


def js(body: bytes) -> Any:
    return json.loads(body)


# --- Resend ------------------------------------------------------------------------------------

RESEND_KEY = "re_test_abc"
EMAIL = {
    "from": "Acme <no-reply@acme.example>",
    "to": ["user@example.com"],
    "subject": "Hi",
    "html": "<p>Hi</p>",
    "text": "Hi",
    "tags": [{"name": "notification_id", "value": "abc123"}],
}


@pytest.fixture
async def resend() -> AsyncIterator[FakeResend]:
    async with FakeResend(RESEND_KEY) as fake:
        yield fake


def resend_headers(key: str | None = RESEND_KEY, **extra: str) -> dict[str, str]:
    headers = {**UA, **extra}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers


async def test_resend_accepts_a_valid_email(resend: FakeResend) -> None:
    status, headers, body = await call(
        "POST", resend.url + "/emails", json=EMAIL, headers=resend_headers()
    )
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    email_id = js(body)["id"]
    assert str(uuid.UUID(email_id)) == email_id
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= headers.keys()
    assert resend.sent == [EMAIL]
    assert resend.sent_ids == [email_id]
    (rec,) = await resend.wait_for(1)
    assert rec.method == "POST" and rec.path == "/emails" and rec.json == EMAIL
    assert rec.headers["authorization"] == f"Bearer {RESEND_KEY}"


async def test_resend_auth_and_user_agent_errors(resend: FakeResend) -> None:
    status, _, body = await call("POST", resend.url + "/emails", json=EMAIL, headers=UA)
    assert (status, js(body)) == (
        401,
        {
            "statusCode": 401,
            "name": "missing_api_key",
            "message": "Missing API key in the authorization header.",
        },
    )
    status, _, body = await call(
        "POST", resend.url + "/emails", json=EMAIL, headers=resend_headers("re_wrong")
    )
    assert (status, js(body)["name"], js(body)["statusCode"]) == (403, "invalid_api_key", 403)
    status, _, body = await call(
        "POST",
        resend.url + "/emails",
        json=EMAIL,
        headers={"Authorization": f"Bearer {RESEND_KEY}"},
        skip_auto_headers=("User-Agent",),
    )
    assert (status, body) == (403, b"error code: 1010")
    assert resend.sent == []


@pytest.mark.parametrize(
    ("change", "status", "name"),
    [
        ({"from": None}, 422, "missing_required_field"),
        ({"to": None}, 422, "missing_required_field"),
        ({"subject": None}, 422, "missing_required_field"),
        ({"html": None, "text": None}, 422, "missing_required_field"),
        ({"from": "not an address"}, 422, "invalid_from_address"),
        ({"to": 42}, 400, "validation_error"),
        ({"to": ["not-an-address"]}, 422, "validation_error"),
    ],
)
async def test_resend_validates_the_body(
    resend: FakeResend, change: dict[str, Any], status: int, name: str
) -> None:
    email = {k: v for k, v in {**EMAIL, **change}.items() if v is not None}
    got, _, body = await call("POST", resend.url + "/emails", json=email, headers=resend_headers())
    assert (got, js(body)["name"], js(body)["statusCode"]) == (status, name, status)
    assert isinstance(js(body)["message"], str)
    assert resend.sent == []


async def test_resend_to_may_be_a_string(resend: FakeResend) -> None:
    email = {**EMAIL, "to": "user@example.com"}
    status, _, _ = await call("POST", resend.url + "/emails", json=email, headers=resend_headers())
    assert status == 200


async def test_resend_idempotency_key_replays_the_first_answer_and_refuses_a_changed_body(
    resend: FakeResend,
) -> None:
    url, key = resend.url + "/emails", "notif/42/email"
    headers = resend_headers(**{"Idempotency-Key": key})
    first = await call("POST", url, json=EMAIL, headers=headers)
    # same payload with another key order: same answer, nothing new sent
    again = await call("POST", url, data=json.dumps(dict(reversed(EMAIL.items()))), headers=headers)
    assert first[0] == again[0] == 200
    assert js(first[2])["id"] == js(again[2])["id"]
    assert len(resend.sent) == 1

    status, _, body = await call("POST", url, json={**EMAIL, "subject": "Other"}, headers=headers)
    assert (status, js(body)["name"]) == (409, "invalid_idempotent_request")

    for bad in ("", "k" * 257):
        status, _, body = await call(
            "POST", url, json=EMAIL, headers=resend_headers(**{"Idempotency-Key": bad})
        )
        assert (status, js(body)) == (
            400,
            {
                "statusCode": 400,
                "name": "invalid_idempotency_key",
                "message": "The key must be between 1-256 chars.",
            },
        )
    assert len(resend.sent) == 1


async def test_resend_concurrent_idempotent_request(resend: FakeResend) -> None:
    url, headers = resend.url + "/emails", resend_headers(**{"Idempotency-Key": "k1"})
    resend.slow_next(1, 0.3)
    first = asyncio.create_task(call("POST", url, json=EMAIL, headers=headers))
    await resend.wait_for(1)
    status, _, body = await call("POST", url, json=EMAIL, headers=headers)
    assert (status, js(body)["name"]) == (409, "concurrent_idempotent_requests")
    assert (await first)[0] == 200
    assert len(resend.sent) == 1


async def test_resend_scripted_failures(resend: FakeResend) -> None:
    url = resend.url + "/emails"
    headers = resend_headers(**{"Idempotency-Key": "retry-me"})
    resend.rate_limit_next(1, retry_after=3)
    resend.quota_exceeded_next(1)
    resend.fail_next(1, status=500)

    status, h, body = await call("POST", url, json=EMAIL, headers=headers)
    assert (status, js(body)["name"]) == (429, "rate_limit_exceeded")
    assert (h["retry-after"], h["ratelimit-reset"], h["ratelimit-remaining"]) == ("3", "3", "0")
    status, _, body = await call("POST", url, json=EMAIL, headers=headers)
    assert (status, js(body)["name"]) == (429, "daily_quota_exceeded")
    status, _, body = await call("POST", url, json=EMAIL, headers=headers)
    assert (status, js(body)) == (
        500,
        {
            "statusCode": 500,
            "name": "internal_server_error",
            "message": "An unexpected error occurred.",
        },
    )
    # failures are not cached under the key: the retry with the same key sends
    status, _, _ = await call("POST", url, json=EMAIL, headers=headers)
    assert status == 200
    assert len(resend.sent) == 1
    assert len(resend.requests) == 4


async def test_resend_fail_next_with_custom_body_and_delay(resend: FakeResend) -> None:
    resend.fail_next(2, status=502, body="<html>Bad gateway</html>", delay=0.05)
    for _ in range(2):
        started = time.monotonic()
        status, h, body = await call(
            "POST", resend.url + "/emails", json=EMAIL, headers=resend_headers()
        )
        assert (status, body) == (502, b"<html>Bad gateway</html>")
        assert h["content-type"].startswith("text/plain")
        assert time.monotonic() - started >= 0.05
    status, _, _ = await call("POST", resend.url + "/emails", json=EMAIL, headers=resend_headers())
    assert status == 200


async def test_slow_and_hung_requests_time_out_the_client() -> None:
    fake = await FakeResend(RESEND_KEY).start()
    try:
        fake.slow_next(1, 5.0)
        fake.hang_next(1)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await call(
                    "POST", fake.url + "/emails", json=EMAIL, headers=resend_headers(), timeout=0.2
                )
        status, _, _ = await call(
            "POST", fake.url + "/emails", json=EMAIL, headers=resend_headers()
        )
        assert status == 200
        assert len(fake.sent) == 1  # the slowed request's client went away before it was handled
    finally:
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 3.0


async def test_hung_request_is_dropped_at_stop() -> None:
    fake = await FakeResend(RESEND_KEY).start()
    fake.hang_next(1)
    pending = asyncio.create_task(
        call("POST", fake.url + "/emails", json=EMAIL, headers=resend_headers())
    )
    await fake.wait_for(1)
    await fake.stop()
    with pytest.raises(aiohttp.ClientError):
        await pending


async def test_resend_unknown_route_and_method(resend: FakeResend) -> None:
    status, _, body = await call("POST", resend.url + "/nope", json={}, headers=resend_headers())
    assert (status, js(body)["name"]) == (404, "not_found")
    status, _, body = await call("GET", resend.url + "/emails", headers=resend_headers())
    assert (status, js(body)["name"]) == (405, "method_not_allowed")


async def test_wait_for_times_out_with_a_count(resend: FakeResend) -> None:
    with pytest.raises(TimeoutError, match="0 of 1"):
        await resend.wait_for(1, timeout=0.05)


async def test_a_tls_fake_answers_https_to_a_client_trusting_its_ca() -> None:
    async with FakeResend(RESEND_KEY, tls=True) as fake:
        assert fake.url.startswith("https://127.0.0.1:")
        status, _, _ = await call(
            "POST",
            fake.url + "/emails",
            json=EMAIL,
            headers=resend_headers(),
            ssl=fake.ssl_context_for_clients(),
        )
        assert status == 200


# --- SendGrid ----------------------------------------------------------------------------------

SG_KEY = "SG.test.key"
MAIL: dict[str, Any] = {
    "personalizations": [
        {"to": [{"email": "user@example.com"}], "custom_args": {"notification_id": "abc123"}}
    ],
    "from": {"email": "no-reply@acme.example", "name": "Acme"},
    "subject": "Hi",
    "content": [{"type": "text/plain", "value": "Hi"}, {"type": "text/html", "value": "<p>Hi</p>"}],
}


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid(SG_KEY) as fake:
        yield fake


def sg_headers(key: str = SG_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json"}


async def test_sendgrid_accepts_a_valid_mail(sendgrid: FakeSendGrid) -> None:
    status, headers, body = await call(
        "POST", sendgrid.url + "/v3/mail/send", json=MAIL, headers=sg_headers()
    )
    assert (status, body) == (202, b"")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", headers["x-message-id"])
    assert sendgrid.sent == [MAIL]
    assert sendgrid.message_ids == [headers["x-message-id"]]


async def test_sendgrid_sandbox_mode_is_200_and_not_queued(sendgrid: FakeSendGrid) -> None:
    mail = {**MAIL, "mail_settings": {"sandbox_mode": {"enable": True}}}
    status, _, body = await call(
        "POST", sendgrid.url + "/v3/mail/send", json=mail, headers=sg_headers()
    )
    assert (status, body, sendgrid.sent) == (200, b"", [])


async def test_sendgrid_rejects_bad_credentials(sendgrid: FakeSendGrid) -> None:
    expected = {
        "errors": [
            {
                "message": "The provided authorization grant is invalid, expired, or revoked",
                "field": None,
                "help": None,
            }
        ]
    }
    for headers in (sg_headers("SG.wrong"), {}):
        status, _, body = await call(
            "POST", sendgrid.url + "/v3/mail/send", json=MAIL, headers=headers
        )
        assert (status, js(body)) == (401, expected)


@pytest.mark.parametrize(
    ("change", "field", "message_start"),
    [
        ({"personalizations": []}, "personalizations", "You must have at least one"),
        ({"personalizations": [{"to": []}]}, "personalizations.0.to", "The to parameter"),
        (
            {"personalizations": [{"to": [{"name": "x"}]}]},
            "personalizations.0.to.0.email",
            "The to array must at least have an email",
        ),
        ({"from": {"name": "x"}}, "from.email", "The from object must at least have"),
        ({"subject": None}, "subject", "The subject is required"),
        ({"content": None}, "content", "Unless a valid template_id is provided"),
        (
            {"content": [{"type": "text/plain", "value": ""}]},
            "content.0.value",
            "The content value must be a string at least one character",
        ),
        (
            {"content": list(reversed(MAIL["content"]))},
            "content.0.type",
            "Following RFC 1341, section 7.2, if either text/html or text/plain",
        ),
        (
            {"personalizations": [{"to": [{"email": "a@b.example"}], "custom_args": {"n": 1}}]},
            "personalizations.0.custom_args",
            "All values of custom arguments object must be strings",
        ),
        ({"custom_args": {"n": True}}, "custom_args", "All values of custom arguments"),
        ({"headers": {"Subject": "x"}}, "headers", "Header can not be one of the reserved keys"),
    ],
)
async def test_sendgrid_validates_the_body(
    sendgrid: FakeSendGrid, change: dict[str, Any], field: str, message_start: str
) -> None:
    mail = {k: v for k, v in {**MAIL, **change}.items() if v is not None}
    status, _, body = await call(
        "POST", sendgrid.url + "/v3/mail/send", json=mail, headers=sg_headers()
    )
    assert status == 400
    (error,) = js(body)["errors"]
    assert error["field"] == field
    assert error["message"].startswith(message_start)
    assert error["help"].startswith("http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/")
    assert sendgrid.sent == []


async def test_sendgrid_rate_limit_and_failures(sendgrid: FakeSendGrid) -> None:
    sendgrid.rate_limit_next(1, reset_in=5)
    sendgrid.fail_next(1, status=503)
    url = sendgrid.url + "/v3/mail/send"
    status, headers, body = await call("POST", url, json=MAIL, headers=sg_headers())
    assert (status, js(body)) == (
        429,
        {"errors": [{"field": None, "message": "too many requests"}]},
    )
    assert headers["x-ratelimit-remaining"] == "0" and headers["x-ratelimit-limit"].isdigit()
    assert 3 <= int(headers["x-ratelimit-reset"]) - time.time() <= 6
    status, _, body = await call("POST", url, json=MAIL, headers=sg_headers())
    assert (status, js(body)["errors"][0]["message"]) == (
        503,
        "The SendGrid v3 Web API is not available.",
    )
    status, _, _ = await call("POST", url, json=MAIL, headers=sg_headers())
    assert status == 202


# --- Twilio ------------------------------------------------------------------------------------

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "twilio-token-123"
SMS = {"To": "+15558675310", "From": "+15017122661", "Body": "Your code is 123456"}


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


def basic(login: str = ACCOUNT_SID, password: str = AUTH_TOKEN) -> dict[str, str]:
    return {"Authorization": basic_auth(login, password)}


# twilio-python tests/unit/test_request_validator.py
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}


@pytest.mark.parametrize(
    ("url", "params", "expected"),
    [
        (TWILIO_URL, TWILIO_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            TWILIO_PARAMS,
            "kvajT1Ptam85bY51eRf/AJRuM3w=",
        ),
        (
            "http://mycompany.com:80/myapp.php?foo=1&bar=2",
            TWILIO_PARAMS,
            "0ZXoZLH/DfblKGATFgpif+LLRf4=",
        ),
        (
            "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
            TWILIO_PARAMS,
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
        ),
        (
            TWILIO_URL,
            {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234"]},
            "IK+Dwps556ElfBT0I3Rgjkr1wJU=",
        ),
    ],
)
def test_twilio_signature_vectors(url: str, params: dict[str, Any], expected: str) -> None:
    assert twilio_signature("12345", url, params) == expected


def test_twilio_signature_json_body_vector() -> None:
    body = '{"property": "value", "boolean": true}'
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert digest == "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    url = f"{TWILIO_URL}&bodySHA256={digest}"
    assert twilio_signature("12345", url, {}) == "a9nBmqA0ju/hNViExpshrM61xv4="


def test_num_segments_counts_gsm7_extension_and_ucs2_characters() -> None:
    assert num_segments("a" * 160) == 1
    assert num_segments("a" * 161) == 2
    assert num_segments("€" * 80) == 1  # GSM-7 extension chars take two septets
    assert num_segments("€" * 81) == 2
    assert num_segments("ж" * 70) == 1
    assert num_segments("ж" * 71) == 2


async def test_twilio_accepts_a_valid_sms(twilio: FakeTwilio) -> None:
    status, headers, body = await call(
        "POST", twilio.url + twilio.messages_path, data=SMS, headers=basic()
    )
    assert status == 201
    assert headers["content-type"].startswith("application/json")
    msg = js(body)
    assert re.fullmatch(r"SM[0-9a-f]{32}", msg["sid"])
    assert (msg["status"], msg["to"], msg["from"], msg["body"]) == (
        "queued",
        SMS["To"],
        SMS["From"],
        SMS["Body"],
    )
    assert (msg["account_sid"], msg["error_code"], msg["num_segments"]) == (ACCOUNT_SID, None, "1")
    assert msg["uri"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{msg['sid']}.json"
    assert parsedate_to_datetime(msg["date_created"]).utcoffset() is not None
    assert msg["date_created"].endswith("+0000")
    assert twilio.sent == [msg]
    (rec,) = await twilio.wait_for(1)
    assert rec.form == SMS

    status, _, body = await call("GET", twilio.url + msg["uri"], headers=basic())
    assert (status, js(body)["sid"]) == (200, msg["sid"])


async def test_twilio_messaging_service_and_api_key(twilio: FakeTwilio) -> None:
    twilio.api_keys["SK" + "2" * 32] = "key-secret"
    form = {"To": SMS["To"], "MessagingServiceSid": "MG" + "3" * 32, "Body": "hi"}
    status, _, body = await call(
        "POST",
        twilio.url + twilio.messages_path,
        data=form,
        headers=basic("SK" + "2" * 32, "key-secret"),
    )
    assert status == 201
    assert (js(body)["status"], js(body)["num_segments"], js(body)["from"]) == (
        "accepted",
        "0",
        None,
    )


async def test_twilio_rejects_bad_credentials(twilio: FakeTwilio) -> None:
    expected = {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    for headers in (basic(password="wrong"), {}):
        status, _, body = await call(
            "POST", twilio.url + twilio.messages_path, data=SMS, headers=headers
        )
        assert (status, js(body)) == (401, expected)
    other = f"/2010-04-01/Accounts/AC{'9' * 32}/Messages.json"
    status, _, body = await call("POST", twilio.url + other, data=SMS, headers=basic())
    assert (status, js(body)["code"]) == (404, 20404)


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": SMS["From"], "Body": "x"}, 21604),
        ({"To": SMS["To"], "Body": "x"}, 21603),
        ({"To": SMS["To"], "From": SMS["From"]}, 21602),
        ({**SMS, "To": "5551234567"}, 21211),
        ({**SMS, "From": "not a number!"}, 21212),
        ({**SMS, "Body": "x" * 1601}, 21617),
        ({**SMS, "StatusCallback": "ftp://example.com/cb"}, 21609),
    ],
)
async def test_twilio_validates_the_form(
    twilio: FakeTwilio, form: dict[str, str], code: int
) -> None:
    status, _, body = await call(
        "POST", twilio.url + twilio.messages_path, data=form, headers=basic()
    )
    error = js(body)
    assert (status, error["code"], error["status"]) == (400, code, 400)
    assert error["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    assert twilio.sent == []


async def test_twilio_wants_a_form_not_json(twilio: FakeTwilio) -> None:
    status, _, body = await call(
        "POST", twilio.url + twilio.messages_path, json=SMS, headers=basic()
    )
    assert (status, js(body)["code"]) == (400, 21604)


@pytest.mark.parametrize(
    ("code", "status"), [(21211, 400), (21610, 400), (21614, 400), (20429, 429), (20500, 500)]
)
async def test_twilio_error_for_number_answers_the_code_with_its_status(
    twilio: FakeTwilio, code: int, status: int
) -> None:
    twilio.error_for_number[SMS["To"]] = code
    got, _, body = await call("POST", twilio.url + twilio.messages_path, data=SMS, headers=basic())
    assert (got, js(body)["code"], js(body)["status"]) == (status, code, status)
    assert twilio.sent == []


async def test_twilio_fail_next_default_body(twilio: FakeTwilio) -> None:
    twilio.fail_next(1, status=503)
    status, _, body = await call(
        "POST", twilio.url + twilio.messages_path, data=SMS, headers=basic()
    )
    assert (status, js(body)["code"], js(body)["more_info"]) == (
        503,
        20503,
        "https://www.twilio.com/docs/errors/20503",
    )


async def test_twilio_status_callback_is_signed(
    twilio: FakeTwilio, webhook_sink: WebhookSink
) -> None:
    callback = webhook_sink.url + "/twilio/status?tenant=7"
    twilio.error_for_number[SMS["To"]] = 30003  # accepted, fails asynchronously
    status, _, body = await call(
        "POST",
        twilio.url + twilio.messages_path,
        data={**SMS, "StatusCallback": callback},
        headers=basic(),
    )
    assert status == 201
    sid = js(body)["sid"]
    assert await twilio.send_status_callback(sid) == (200, '{"ok": true}')
    (rec,) = await webhook_sink.wait_for(1)
    form = dict(parse_qsl(rec.body.decode()))
    assert form["MessageStatus"] == form["SmsStatus"] == "undelivered"
    assert (form["ErrorCode"], form["MessageSid"], form["AccountSid"]) == (
        "30003",
        sid,
        ACCOUNT_SID,
    )
    headers = {k.lower(): v for k, v in rec.headers.items()}
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert headers["x-twilio-signature"] == twilio_signature(AUTH_TOKEN, callback, form)
    assert twilio.messages[sid]["status"] == "undelivered"


# --- FCM + Google OAuth2 -----------------------------------------------------------------------


@functools.cache
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def fcm() -> AsyncIterator[FakeFCM]:
    fake = await FakeFCM.start_with_service_account("demo-project")
    try:
        yield fake
    finally:
        await fake.stop()


async def get_token(fcm: FakeFCM, **assertion_kwargs: Any) -> tuple[int, dict[str, Any]]:
    assert fcm.service_account is not None and fcm.private_key is not None
    key = assertion_kwargs.pop("key", fcm.private_key)
    assertion = sign_assertion(fcm.service_account, key, **assertion_kwargs)
    status, _, body = await call(
        "POST",
        fcm.token_uri,
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion},
    )
    return status, js(body)


async def fcm_send(fcm: FakeFCM, token: str | None, body: Any) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, h, raw = await call("POST", fcm.url + fcm.send_path, json=body, headers=headers)
    return status, h, js(raw)


def test_make_service_account_has_googles_fields_and_a_2048_bit_key() -> None:
    info, key = make_service_account("http://127.0.0.1:1/token", "p1")
    assert {
        "type",
        "project_id",
        "private_key_id",
        "private_key",
        "client_email",
        "client_id",
        "token_uri",
    } <= info.keys()
    assert info["type"] == "service_account" and info["project_id"] == "p1"
    assert info["private_key"].startswith("-----BEGIN PRIVATE KEY-----\n")
    assert info["client_email"].endswith("@p1.iam.gserviceaccount.com")
    assert key.key_size == 2048


async def test_fcm_send_with_an_issued_token_returns_a_message_name(fcm: FakeFCM) -> None:
    status, token = await get_token(fcm)
    assert status == 200
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3599
    message = {"token": "device-1", "notification": {"title": "Hi"}, "data": {"order": "42"}}
    status, _, body = await fcm_send(fcm, token["access_token"], {"message": message})
    assert status == 200
    assert re.fullmatch(r"projects/demo-project/messages/0:\d+%[0-9a-f]{16}", body["name"])
    assert fcm.sent == [message]
    assert len(fcm.token_requests) == 1 and len(fcm.requests) == 1
    # the token endpoint's own URL is an accepted audience too (older google-auth)
    status, _ = await get_token(fcm, audience=fcm.token_uri)
    assert status == 200


@pytest.mark.parametrize(
    ("kwargs", "error", "description"),
    [
        ({"key": "other"}, "invalid_grant", "Invalid JWT Signature."),
        (
            {"audience": "https://example.com/token"},
            "invalid_grant",
            "Invalid JWT: Failed audience",
        ),
        ({"lifetime": 7200}, "invalid_grant", "Invalid JWT: Token must be a short-lived token"),
        ({"iat": int(time.time()) - 7200}, "invalid_grant", "Invalid JWT: Token must be"),
        ({"scope": "https://www.googleapis.com/auth/userinfo.email"}, "invalid_scope", "Invalid"),
        ({"header": {"alg": "RS256", "typ": "JWT"}}, "invalid_grant", "Invalid JWT: header"),
        ({"header": {"alg": "HS256", "kid": "x"}}, "invalid_grant", "Invalid JWT: alg"),
    ],
)
async def test_fcm_token_endpoint_rejects_bad_assertions(
    fcm: FakeFCM, kwargs: dict[str, Any], error: str, description: str
) -> None:
    if kwargs.get("key") == "other":
        kwargs["key"] = other_key()
    status, body = await get_token(fcm, **kwargs)
    assert status == 400
    assert body["error"] == error
    assert body["error_description"].startswith(description)
    assert fcm.issued == {}


async def test_fcm_token_endpoint_other_errors(fcm: FakeFCM) -> None:
    status, _, body = await call("POST", fcm.token_uri, data={"grant_type": "password"})
    assert (status, js(body)["error"]) == (400, "unsupported_grant_type")
    fcm.token_error_next(1, status=503, error="temporarily_unavailable", description="later")
    status, body2 = await get_token(fcm)
    assert (status, body2) == (
        503,
        {"error": "temporarily_unavailable", "error_description": "later"},
    )
    assert (await get_token(fcm))[0] == 200


async def test_fcm_send_needs_an_issued_unexpired_token(fcm: FakeFCM) -> None:
    body = {"message": {"token": "device-1"}}
    status, headers, error = await fcm_send(fcm, None, body)
    assert (status, error["error"]["status"], error["error"]["code"]) == (
        401,
        "UNAUTHENTICATED",
        401,
    )
    assert "www-authenticate" in headers
    status, _, error = await fcm_send(fcm, "ya29.forged", body)
    assert (status, error["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert error["error"]["message"].startswith("Request had invalid authentication credentials")

    _, token = await get_token(fcm)
    assert (await fcm_send(fcm, token["access_token"], body))[0] == 200
    fcm.expire_tokens()
    assert (await fcm_send(fcm, token["access_token"], body))[0] == 401
    _, fresh = await get_token(fcm)
    assert (await fcm_send(fcm, fresh["access_token"], body))[0] == 200


async def test_fcm_token_with_zero_lifetime_is_refused_at_send() -> None:
    fake = await FakeFCM.start_with_service_account(expires_in=0)
    try:
        _, token = await get_token(fake)
        assert token["expires_in"] == 0
        status, _, _ = await fcm_send(fake, token["access_token"], {"message": {"token": "d"}})
        assert status == 401
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    ("message", "field", "error_code"),
    [
        ({"token": "d", "data": {"n": 12}}, "message.data[0].value", None),
        ({"token": "d", "data": {"a": "x", "b": True}}, "message.data[1].value", None),
        ({"token": "d", "topic": "news"}, "message", None),
        ({"notification": {"title": "x"}}, "message", "INVALID_ARGUMENT"),
        ({"token": "d", "to": "legacy"}, None, None),
    ],
)
async def test_fcm_validates_the_message(
    fcm: FakeFCM, message: dict[str, Any], field: str | None, error_code: str | None
) -> None:
    _, token = await get_token(fcm)
    status, _, body = await fcm_send(fcm, token["access_token"], {"message": message})
    error = body["error"]
    assert (status, error["code"], error["status"]) == (400, 400, "INVALID_ARGUMENT")
    types = {d["@type"]: d for d in error["details"]}
    if error_code is not None:
        fcm_error = types["type.googleapis.com/google.firebase.fcm.v1.FcmError"]
        assert fcm_error["errorCode"] == error_code
    violations = types["type.googleapis.com/google.rpc.BadRequest"]["fieldViolations"]
    assert violations[0].get("field") == field
    assert fcm.sent == []


async def test_fcm_unregistered_and_scripted_errors(fcm: FakeFCM) -> None:
    _, token = await get_token(fcm)
    access = token["access_token"]
    fcm.unregistered.add("gone")
    status, _, body = await fcm_send(fcm, access, {"message": {"token": "gone"}})
    assert (status, body) == (
        404,
        {
            "error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        },
    )
    fcm.fcm_error_next(1, 429, "QUOTA_EXCEEDED", retry_after=60)
    fcm.fcm_error_next(1, 503, "UNAVAILABLE")
    fcm.fail_next(1, status=500)
    status, headers, body = await fcm_send(fcm, access, {"message": {"token": "d"}})
    assert (status, headers["retry-after"], body["error"]["status"]) == (
        429,
        "60",
        "RESOURCE_EXHAUSTED",
    )
    assert body["error"]["details"][0]["errorCode"] == "QUOTA_EXCEEDED"
    status, headers, body = await fcm_send(fcm, access, {"message": {"token": "d"}})
    assert (status, body["error"]["details"][0]["errorCode"]) == (503, "UNAVAILABLE")
    assert "retry-after" not in headers
    status, _, body = await fcm_send(fcm, access, {"message": {"token": "d"}})
    assert (status, body["error"]["status"]) == (500, "INTERNAL")
    status, _, _ = await fcm_send(fcm, access, {"message": {"token": "d"}})
    assert status == 200
    assert len(fcm.sent) == 1


async def test_fcm_validate_only_and_wrong_project(fcm: FakeFCM) -> None:
    _, token = await get_token(fcm)
    access = token["access_token"]
    status, _, body = await fcm_send(
        fcm, access, {"message": {"token": "d"}, "validate_only": True}
    )
    assert (status, body["name"], fcm.sent) == (
        200,
        "projects/demo-project/messages/fake_message_id",
        [],
    )
    status, _, raw = await call(
        "POST",
        fcm.url + "/v1/projects/other/messages:send",
        json={"message": {"token": "d"}},
        headers={"Authorization": f"Bearer {access}"},
    )
    assert (status, js(raw)["error"]["status"]) == (403, "PERMISSION_DENIED")


# --- SMTP --------------------------------------------------------------------------------------


def make_email(to: str = "user@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Acme <no-reply@acme.example>"
    msg["To"] = to
    msg["Subject"] = "Héllo"
    msg.set_content("plain body")
    msg.add_alternative("<p>html body</p>", subtype="html")
    return msg


async def test_smtp_plain_delivery() -> None:
    async with FakeSMTP() as smtp:
        errors, reply = await aiosmtplib.send(
            make_email(), hostname=smtp.host, port=smtp.port, timeout=5
        )
        assert errors == {}
        assert reply.startswith("2.0.0") or "accepted" in reply
        (got,) = await smtp.wait_for(1)
        assert got.mail_from == "no-reply@acme.example"
        assert got.rcpt_tos == ["user@example.com"]
        assert got.message["Subject"] == "Héllo"
        assert got.message.get_body(("plain",)).get_content().strip() == "plain body"  # type: ignore[union-attr]
        assert (got.tls, got.auth_user) == (False, None)


async def test_smtp_auth_accepts_the_password_and_refuses_a_wrong_one_or_none() -> None:
    async with FakeSMTP(username="mailer", password="s3cret") as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
            await aiosmtplib.send(
                make_email(),
                hostname=smtp.host,
                port=smtp.port,
                username="mailer",
                password="nope",
                timeout=5,
            )
        assert wrong.value.code == 535
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as anonymous:
            await aiosmtplib.send(make_email(), hostname=smtp.host, port=smtp.port, timeout=5)
        assert anonymous.value.code == 530
        await aiosmtplib.send(
            make_email(),
            hostname=smtp.host,
            port=smtp.port,
            username="mailer",
            password="s3cret",
            timeout=5,
        )
        (got,) = await smtp.wait_for(1)
        assert got.auth_user == "mailer"
        # aiosmtplib tries each offered mechanism before giving up on the wrong password
        assert smtp.auth_attempts[-1] == ("mailer", True)
        assert all(ok is False for _, ok in smtp.auth_attempts[:-1])


async def test_smtp_starttls_with_auth() -> None:
    async with FakeSMTP(username="u", password="p", tls="starttls") as smtp:
        await aiosmtplib.send(
            make_email(),
            hostname=smtp.host,
            port=smtp.port,
            start_tls=True,
            tls_context=smtp.ssl_context_for_clients(),
            username="u",
            password="p",
            timeout=5,
        )
        (got,) = await smtp.wait_for(1)
        assert (got.tls, got.auth_user) == (True, "u")


async def test_smtp_implicit_tls() -> None:
    async with FakeSMTP(tls="implicit") as smtp:
        await aiosmtplib.send(
            make_email(),
            hostname=smtp.host,
            port=smtp.port,
            use_tls=True,
            tls_context=smtp.ssl_context_for_clients(),
            timeout=5,
        )
        (got,) = await smtp.wait_for(1)
        assert got.tls is True


async def test_smtp_scripted_replies() -> None:
    async with FakeSMTP() as smtp:
        smtp.reply_next(1, 451, "4.3.0 Try again later")
        smtp.reply_next(1, 550, "5.7.1 Message rejected")
        smtp.rcpt_replies["nobody@example.com"] = "550 5.1.1 User unknown"
        for code in (451, 550):
            with pytest.raises(aiosmtplib.SMTPDataError) as err:
                await aiosmtplib.send(make_email(), hostname=smtp.host, port=smtp.port, timeout=5)
            assert err.value.code == code
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await aiosmtplib.send(
                make_email("nobody@example.com"), hostname=smtp.host, port=smtp.port, timeout=5
            )
        await aiosmtplib.send(make_email(), hostname=smtp.host, port=smtp.port, timeout=5)
        await smtp.wait_for(1)
        assert [a.reply[:3] for a in smtp.attempts] == ["451", "550", "250"]
        assert len(smtp.messages) == 1


async def test_smtp_slow_reply_times_out_the_client() -> None:
    async with FakeSMTP() as smtp:
        smtp.slow_next(1, 5.0)
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await aiosmtplib.send(make_email(), hostname=smtp.host, port=smtp.port, timeout=0.3)


# --- outbound webhooks: a consumer that checks signatures -----------------------------------------


async def test_webhook_receiver_accepts_a_valid_signature_and_refuses_a_forged_one() -> None:
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"receiver-test-secret-0123456").decode()
    body = '{"type":"order.shipped"}'
    now = datetime.datetime.now(datetime.UTC)
    headers = {
        "webhook-id": "pgn_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign("pgn_1", now, body),
    }
    async with FakeWebhookReceiver(secret) as fake:
        url = fake.url + "/hooks/orders"
        ok, _, _ = await call("POST", url, data=body, headers=headers)
        forged, _, answer = await call("POST", url, data=body + " ", headers=headers)
        missing, _, _ = await call("POST", url, data=body)
    assert (ok, forged, missing) == (204, 401, 401)
    assert js(answer) == {"error": "invalid signature"}
    assert fake.received == [body.encode()]
    assert len(fake.requests) == 3


# --- inbound webhook signatures ----------------------------------------------------------------


def test_svix_headers_match_the_published_vector() -> None:
    headers = svix_headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        b'{"test": 2432232314}',
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
    )
    assert headers["svix-id"] == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert headers["svix-timestamp"] == "1614265330"
    assert headers["svix-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_svix_headers_verify_with_standard_webhooks() -> None:
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"resend-test-secret-0123456789").decode()
    body = b'{"type":"email.delivered","created_at":"2024-01-01T00:00:00.000Z","data":{}}'
    headers = svix_headers(
        secret, body, extra_secrets=["whsec_" + base64.b64encode(b"old").decode()]
    )
    assert headers["svix-id"].startswith("msg_")
    assert len(headers["svix-signature"].split(" ")) == 2
    webhook_headers = {
        "webhook-id": headers["svix-id"],
        "webhook-timestamp": headers["svix-timestamp"],
        "webhook-signature": headers["svix-signature"],
    }
    assert Webhook(secret).verify(body, webhook_headers)["type"] == "email.delivered"


SENDGRID_PY_BODY = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]\r\n'
)


def test_verify_sendgrid_accepts_the_published_python_and_node_vectors() -> None:
    py_key = (
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3G"
        "Rqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
    )
    py_sig = (
        "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15Tl"
        "uLtEZtM="
    )
    assert verify_sendgrid(py_key, py_sig, "1600112502", SENDGRID_PY_BODY)
    assert not verify_sendgrid(py_key, py_sig, "1600112502", SENDGRID_PY_BODY.rstrip(b"\r\n"))
    node_key = (
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7"
        "yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA=="
    )
    node_sig = (
        "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDW"
        "YNH2j/0="
    )
    node_body = b'{"category":"example_payload","event":"test_event","message_id":"message_id"}'
    assert verify_sendgrid(node_key, node_sig, "1588788367", node_body)


def test_sendgrid_signer_round_trip() -> None:
    signer = SendGridSigner()
    assert signer.public_key_b64.startswith("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE")
    body = SendGridSigner.body([{"event": "delivered", "sg_event_id": "e1"}])
    assert body.endswith(b"]\r\n")
    headers = signer.headers(body, timestamp=1700000000)
    assert headers[SENDGRID_TIMESTAMP] == "1700000000"
    assert verify_sendgrid(signer.public_key_b64, headers[SENDGRID_SIGNATURE], "1700000000", body)
    assert not verify_sendgrid(
        signer.public_key_b64, headers[SENDGRID_SIGNATURE], "1700000001", body
    )


async def test_post_webhook_delivers_svix_and_sendgrid_signed_events_byte_exact(
    webhook_sink: WebhookSink,
) -> None:
    secret = "whsec_" + base64.b64encode(b"resend-test-secret-0123456789").decode()
    body = json.dumps(resend_event("email.bounced", "e-1", bounce={"type": "Permanent"})).encode()
    assert (await post_webhook(webhook_sink.url + "/resend", body, svix_headers(secret, body)))[
        0
    ] == 200
    signer = SendGridSigner()
    events = SendGridSigner.body([sendgrid_event("delivered", "LRzXl_NHStOGhQ4kofSm_A", n="1")])
    await post_webhook(webhook_sink.url + "/sendgrid", events, signer.headers(events))
    resend_rec, sendgrid_rec = await webhook_sink.wait_for(2)
    assert resend_rec.body == body and "svix-signature" in {k.lower() for k in resend_rec.headers}
    assert sendgrid_rec.body == events  # byte-exact, CRLF included
    headers = {k.lower(): v for k, v in sendgrid_rec.headers.items()}
    assert verify_sendgrid(
        signer.public_key_b64,
        headers[SENDGRID_SIGNATURE.lower()],
        headers[SENDGRID_TIMESTAMP.lower()],
        sendgrid_rec.body,
    )
    (event,) = json.loads(sendgrid_rec.body)
    assert event["sg_message_id"].split(".", 1)[0] == "LRzXl_NHStOGhQ4kofSm_A"
    assert event["n"] == "1"
