"""Hostile requests to the public endpoints (provider webhooks, unsubscribe): each gets a 4xx and
changes nothing, never a 500. The app is served on 127.0.0.1 as the worker serves it; the store
records every call, so "nothing changed" means it was never asked to write."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from pgnotify_worker.adapters import http_server
from pgnotify_worker.adapters.inbound import (
    MAX_JSON_DEPTH,
    BadRequest,
    Inbound,
    parse_json,
)
from pgnotify_worker.adapters.providers.sendgrid import sendgrid_report
from pgnotify_worker.adapters.registry import inbound_endpoints
from pgnotify_worker.adapters.unsubscribe_http import UnsubscribePages
from pgnotify_worker.config import load_settings
from pgnotify_worker.core import signing
from pgnotify_worker.core.unsubscribe import TokenInvalid, make_token, read_token
from tests.fakes.twilio import twilio_signature
from tests.fakes.webhooks_in import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, SendGridSigner
from tests.fakes.webhooks_in import svix_signature as sign_svix

RESEND_SECRET = "whsec_" + base64.b64encode(b"resend-webhook-secret-0123456789").decode()
TWILIO_TOKEN = "twilio-auth-token"
UNSUB_KEY = b"unsubscribe-secret-0123456789abcdef"
TOO_BIG = http_server.MAX_BODY + 1


# --- the app, with a store that records what it is asked ----------------------------------------


@dataclass
class RecordingStore:
    events: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[tuple[Any, ...]] = field(default_factory=list)
    opted_out: list[tuple[str, str]] = field(default_factory=list)

    async def opt_out(self, user_id: str, category: str) -> None:
        self.opted_out.append((user_id, category))

    async def category_is_critical(self, category: str) -> bool:
        return False

    async def provider_event(self, provider: str, **report: Any) -> None:
        self.events.append({"provider": provider, **report})
        # not one of ours: nothing to suppress

    async def suppress(self, *args: Any) -> None:
        self.suppressed.append(args)

    @property
    def writes(self) -> int:
        return len(self.events) + len(self.suppressed) + len(self.opted_out)


@dataclass
class Served:
    base: str
    host: str
    port: int
    store: RecordingStore
    sendgrid: SendGridSigner


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    store = RecordingStore()
    signer = SendGridSigner()
    settings = load_settings(
        resend_webhook_secret=RESEND_SECRET,
        sendgrid_webhook_public_key=signer.public_key_b64,
        twilio_auth_token=TWILIO_TOKEN,
    )
    inbound = Inbound(
        lambda: store,  # type: ignore[arg-type, return-value]
        inbound_endpoints(settings),
    )
    pages = UnsubscribePages(lambda: store, UNSUB_KEY)  # type: ignore[arg-type, return-value]

    async def status() -> dict[str, Any]:
        return {}

    async def ready() -> list[str]:
        return []

    app = http_server.make_app(status, ready, lambda: b"", (inbound.routes, pages.routes))
    runner, port = await http_server.start(app, "127.0.0.1", 0)
    try:
        yield Served(f"http://127.0.0.1:{port}", "127.0.0.1", port, store, signer)
    finally:
        await runner.cleanup()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.text()


async def raw(served: Served, head: bytes, body: bytes = b"") -> int:
    """Send bytes aiohttp's client would refuse (non-ASCII header values); the status code."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(
            head + b"\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return int(line.split()[1])


def svix(body: bytes, *, stamp: str | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    """Svix headers signed over exactly `stamp` (a valid signature for whatever it says)."""
    stamp = str(int(time.time())) if stamp is None else stamp
    return {
        "Content-Type": "application/json",
        "svix-id": msg_id,
        "svix-timestamp": stamp,
        "svix-signature": sign_svix(RESEND_SECRET, msg_id, stamp, body),
    }


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- pure: timestamps, JSON, tokens --------------------------------------------------------------


@pytest.mark.parametrize(
    "stamp",
    ["9" * 400, "1" * 21, "inf", "-inf", "nan", "1e999", "", " ", "abc", "١٦١٤٢٦٥٣٣٠", "0x10"],
)
def test_a_timestamp_that_is_not_one_is_none_never_an_exception(stamp: str) -> None:
    assert signing.parse_timestamp(stamp) is None
    headers = {"svix-id": "m", "svix-timestamp": stamp, "svix-signature": "v1,AAAA"}
    assert not signing.verify_svix(RESEND_SECRET, headers, b"{}", time.time())


def test_timestamps_that_are_parse() -> None:
    assert signing.parse_timestamp("1614265330") == 1614265330
    assert signing.parse_timestamp(" 1614265330.9 ") == 1614265330


def test_signature_checks_refuse_non_ascii_instead_of_raising() -> None:
    assert not signing.verify_twilio(TWILIO_TOKEN, "https://a.example/x", {}, "é")
    assert not signing.verify_twilio(TWILIO_TOKEN, "https://a.example/x", {}, "\udcff")
    signer = SendGridSigner()
    assert not signing.verify_sendgrid(signer.public_key_b64, "MEUCIQ==", "\udcff\udcfe", b"[]")
    assert not signing.verify_sendgrid(signer.public_key_b64, "é", "1", b"[]")
    headers = {"svix-id": "\udcff", "svix-timestamp": "1", "svix-signature": "v1,AAAA"}
    assert not signing.verify_svix(RESEND_SECRET, headers, b"{}", 1)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (nested(100_000), "nested too deeply"),
        (nested(MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH}"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, f"deeper than {MAX_JSON_DEPTH}"),
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b'{"a": NaN}', "not JSON"),
        (b"[Infinity]", "not JSON"),
        (b"[1e999]", "out of range"),
        (b"[" + b"9" * 5000 + b"]", "not JSON"),
    ],
)
def test_parse_json_refuses_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_json(body)


def test_parse_json_keeps_what_postgres_cannot_store_out() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH)) is not None
    cleaned = parse_json(b'{"a\\u0000": ["x\\u0000y", "\\ud800", "ok \\ud83d\\ude00"]}')
    assert cleaned == {"a\ufffd": ["x\ufffdy", "?", "ok \U0001f600"]}


def test_a_sendgrid_notification_id_must_fit_a_bigint() -> None:
    item = {"event": "delivered", "sg_event_id": "e1", "sg_message_id": "m.1"}
    for value, expected in (("42", 42), ("9" * 19, None), ("٣", None), ("9" * 5000, None)):
        report = sendgrid_report({**item, "notification_id": value})
        assert report is not None and report.notification_id == expected, value


@pytest.mark.parametrize("token", ["u1.a.b.c.é", "u1.a.b.c.\udcff", "u1." + "A" * 5000])
def test_an_odd_unsubscribe_token_is_invalid_not_an_error(token: str) -> None:
    with pytest.raises(TokenInvalid):
        read_token(UNSUB_KEY, token, 0)


# --- Resend (Svix) -------------------------------------------------------------------------------


@pytest.mark.parametrize("stamp", ["9" * 400, "1e999", "inf", "nan", "soon"])
async def test_resend_a_timestamp_that_is_not_a_time_is_400(served: Served, stamp: str) -> None:
    body = b'{"type": "email.delivered", "data": {"email_id": "e-1"}}'
    status, text = await post(served.base + "/webhooks/resend", body, svix(body, stamp=stamp))
    assert status == 400 and "svix-timestamp" in text
    assert served.store.writes == 0


@pytest.mark.parametrize("depth", [100_000, MAX_JSON_DEPTH + 1])
async def test_resend_deep_json_with_a_valid_signature_is_400(served: Served, depth: int) -> None:
    body = b'{"type": "email.delivered", "data": ' + nested(depth) + b"}"
    status, text = await post(served.base + "/webhooks/resend", body, svix(body))
    assert status == 400 and "nested" in text
    assert served.store.writes == 0


async def test_resend_non_ascii_headers_are_400(served: Served) -> None:
    body = b"{}"
    stamp = str(int(time.time())).encode()
    head = b"POST /webhooks/resend HTTP/1.1\r\nContent-Type: application/json"
    status = await raw(
        served,
        head + b"\r\nsvix-id: \xff\xfe\r\nsvix-timestamp: " + stamp + b"\r\nsvix-signature: v1,A",
        body,
    )
    assert status == 400
    status = await raw(
        served,
        head + b"\r\nsvix-id: m\r\nsvix-timestamp: \xd9\xa1\r\nsvix-signature: v1,A",
        body,
    )
    assert status == 400
    assert served.store.writes == 0


async def test_resend_body_over_the_cap_is_413_and_a_gzip_bomb_too(served: Served) -> None:
    big = b" " * TOO_BIG
    status, _ = await post(served.base + "/webhooks/resend", big, svix(big))
    assert status == 413
    bomb = gzip.compress(b" " * (8 * TOO_BIG))  # ~8 KB on the wire
    headers = {**svix(bomb), "Content-Encoding": "gzip"}
    status, _ = await post(served.base + "/webhooks/resend", bomb, headers)
    assert status == 413
    assert served.store.writes == 0


async def test_resend_standard_webhooks_header_names_and_odd_strings(served: Served) -> None:
    """webhook-id/-timestamp/-signature verify (they used to 500 on a missing svix-id), and NUL
    or a lone surrogate in a signed report is stored replaced, not a failing write."""
    body = json.dumps(
        {"type": "email.failed", "data": {"email_id": "e-\u0000-\ud800"}}, ensure_ascii=True
    ).encode()
    signed = svix(body, msg_id="msg_std")
    headers = {
        "Content-Type": "application/json",
        "webhook-id": signed["svix-id"],
        "webhook-timestamp": signed["svix-timestamp"],
        "webhook-signature": signed["svix-signature"],
    }
    status, text = await post(served.base + "/webhooks/resend", body, headers)
    assert (status, json.loads(text)) == (200, {"recorded": 0})
    (event,) = served.store.events
    assert event["external_id"] == "msg_std"
    assert event["provider_message_id"] == "e-\ufffd-?"


# --- SendGrid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stamp", ["9" * 400, "inf", "later"])
async def test_sendgrid_a_timestamp_that_is_not_a_time_is_400(served: Served, stamp: str) -> None:
    body = b"[]"
    headers = {
        "Content-Type": "application/json",
        SENDGRID_SIGNATURE: served.sendgrid.sign(body, stamp),
        SENDGRID_TIMESTAMP: stamp,
    }
    status, text = await post(served.base + "/webhooks/sendgrid", body, headers)
    assert status == 400 and "timestamp" in text
    assert served.store.writes == 0


async def test_sendgrid_non_ascii_headers_are_400(served: Served) -> None:
    head = (
        b"POST /webhooks/sendgrid HTTP/1.1\r\nContent-Type: application/json\r\n"
        + SENDGRID_SIGNATURE.encode()
        + b": MEUCIQ==\r\n"
        + SENDGRID_TIMESTAMP.encode()
    )
    assert await raw(served, head + b": \xff\xfe", b"[]") == 400
    head = (
        b"POST /webhooks/sendgrid HTTP/1.1\r\nContent-Type: application/json\r\n"
        + SENDGRID_TIMESTAMP.encode()
        + b": 1600112502\r\n"
        + SENDGRID_SIGNATURE.encode()
    )
    assert await raw(served, head + b": \xff\xfe", b"[]") == 400
    assert served.store.writes == 0


async def test_sendgrid_deep_json_with_a_valid_signature_is_400(served: Served) -> None:
    body = nested(50_000)
    status, text = await post(
        served.base + "/webhooks/sendgrid",
        body,
        {"Content-Type": "application/json", **served.sendgrid.headers(body)},
    )
    assert status == 400 and "nested" in text
    assert served.store.writes == 0


async def test_sendgrid_body_over_the_cap_is_413(served: Served) -> None:
    big = b" " * TOO_BIG
    headers = {"Content-Type": "application/json", **served.sendgrid.headers(big)}
    assert (await post(served.base + "/webhooks/sendgrid", big, headers))[0] == 413
    assert served.store.writes == 0


# --- Twilio --------------------------------------------------------------------------------------


async def test_twilio_only_reads_urlencoded_forms(served: Served) -> None:
    url = served.base + "/webhooks/twilio"
    multipart = {"Content-Type": "multipart/form-data; boundary=x", "X-Twilio-Signature": "abc"}
    assert (await post(url, b"--x\r\nbroken", multipart))[0] == 415
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, text = await post(url, b"MessageSid=\xff\xfe", {**form, "X-Twilio-Signature": "a"})
    assert status == 400 and "UTF-8" in text
    assert (await post(url, b"a" * TOO_BIG, form))[0] == 413
    assert served.store.writes == 0


async def test_twilio_non_ascii_signature_is_400(served: Served) -> None:
    head = (
        b"POST /webhooks/twilio HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nX-Twilio-Signature: \xff\xfe"
    )
    assert await raw(served, head, b"MessageSid=SM1&MessageStatus=delivered") == 400
    assert served.store.writes == 0


async def test_twilio_a_signed_nul_is_stored_replaced(served: Served) -> None:
    url = served.base + "/webhooks/twilio"
    params = {"MessageSid": "SM\u00001", "MessageStatus": "delivered"}
    headers = {"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url, params)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=params, headers=headers) as response,
    ):
        assert response.status == 200
    (event,) = served.store.events
    assert event["provider_message_id"] == "SM\ufffd1"


# --- unsubscribe ---------------------------------------------------------------------------------


async def test_unsubscribe_odd_tokens_and_bodies_are_4xx_and_change_nothing(
    served: Served,
) -> None:
    url = served.base + "/unsubscribe"
    token = make_token(UNSUB_KEY, "ann", "news", expires=2_000_000_000)
    async with aiohttp.ClientSession() as http:
        for odd in ("u1.a.b.c.é", "A" * 10_000, "", token + "x"):
            assert (await http.get(url, params={"token": odd})).status == 400, odd
            posted = await http.post(
                url, params={"token": odd}, data={"List-Unsubscribe": "One-Click"}
            )
            assert posted.status == 400, odd
        broken = await http.post(
            url,
            params={"token": token},
            data=b"--x\r\nContent-Disposition: form-data\r\n\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert broken.status == 400
        missing = await http.post(
            url, params={"token": token}, data=b"x", headers={"Content-Type": "multipart/form-data"}
        )
        assert missing.status == 400
        not_form = await http.post(
            url, params={"token": token}, json={"List-Unsubscribe": "One-Click"}
        )
        assert not_form.status == 400
        not_utf8 = await http.post(
            url,
            params={"token": token},
            data=b"List-Unsubscribe=\xff",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert not_utf8.status == 400
        big = await http.post(
            url,
            params={"token": token},
            data=b"a" * TOO_BIG,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert big.status == 413
        assert (await http.head(url, params={"token": token})).status == 200
    assert await raw(served, b"GET /unsubscribe?token=u1.a.b.c.%ff HTTP/1.1") == 400
    assert served.store.writes == 0
    async with aiohttp.ClientSession() as http:  # and the real thing still works
        done = await http.post(url, params={"token": token}, data={"List-Unsubscribe": "One-Click"})
        assert done.status == 200
    assert served.store.writes == 1
