"""Inbound webhook signatures against the providers' published test vectors, and report mapping."""

from __future__ import annotations

import pytest

from pgnotify_worker.adapters.providers.resend import resend_report
from pgnotify_worker.adapters.providers.sendgrid import sendgrid_report
from pgnotify_worker.adapters.providers.twilio import twilio_report
from pgnotify_worker.core import signing

# --- Svix (Resend): the vector from Svix's own tests -----------------------------------------------

SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_HEADERS = {
    "svix-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "svix-timestamp": "1614265330",
    "svix-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}
SVIX_BODY = b'{"test": 2432232314}'


def test_svix_published_vector_verifies() -> None:
    assert signing.verify_svix(SVIX_SECRET, SVIX_HEADERS, SVIX_BODY, now=1614265330 + 10)


@pytest.mark.parametrize(
    ("change", "now"),
    [
        ({"body": b'{"test": 2432232315}'}, 1614265330),
        ({"svix-id": "msg_other"}, 1614265330),
        ({"svix-signature": "v1,AAAA"}, 1614265330),
        ({"svix-signature": ""}, 1614265330),
        ({}, 1614265330 + 301),  # too old
        ({}, 1614265330 - 301),  # too new
    ],
)
def test_svix_refuses_tampering_and_stale_timestamps(change: dict[str, object], now: float) -> None:
    headers = {k: v for k, v in SVIX_HEADERS.items()}
    body = change.pop("body", SVIX_BODY)
    headers.update(change)  # type: ignore[arg-type]
    assert not signing.verify_svix(SVIX_SECRET, headers, body, now)  # type: ignore[arg-type]


def test_svix_header_names_are_case_insensitive() -> None:
    upper = {k.upper(): v for k, v in SVIX_HEADERS.items()}
    assert signing.verify_svix(SVIX_SECRET, upper, SVIX_BODY, now=1614265330)


# --- SendGrid Signed Event Webhook: vectors from sendgrid-python and sendgrid-nodejs ---------------

SENDGRID_PY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==",
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=",
    "1600112502",
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address","sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA","sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0","smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]\r\n',
)
SENDGRID_NODE = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA==",
    "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH2j/0=",
    "1588788367",
    b'{"category":"example_payload","event":"test_event","message_id":"message_id"}',
)


@pytest.mark.parametrize("vector", [SENDGRID_PY, SENDGRID_NODE])
def test_sendgrid_published_vectors_verify(vector: tuple[str, str, str, bytes]) -> None:
    assert signing.verify_sendgrid(*vector)


def test_sendgrid_refuses_a_changed_body_timestamp_or_key() -> None:
    key, signature, stamp, body = SENDGRID_PY
    assert not signing.verify_sendgrid(
        key, signature, stamp, body.rstrip(b"\r\n")
    )  # CRLF is signed
    assert not signing.verify_sendgrid(key, signature, str(int(stamp) + 1), body)
    assert not signing.verify_sendgrid(SENDGRID_NODE[0], signature, stamp, body)
    assert not signing.verify_sendgrid(key, "not base64!", stamp, body)
    assert not signing.verify_sendgrid("garbage", signature, stamp, body)


# --- Twilio: vectors from twilio-python's RequestValidator tests -----------------------------------

TWILIO_TOKEN = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": ["CA1234567890ABCDE"],
    "Digits": ["1234"],
    "From": ["+14158675309"],
    "To": ["+18005551212"],
    "Caller": ["+14158675309"],
}


def test_twilio_signature_matches_the_published_vector() -> None:
    assert (
        signing.twilio_signature(TWILIO_TOKEN, TWILIO_URL, TWILIO_PARAMS)
        == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert (
        signing.twilio_signature(
            TWILIO_TOKEN, "https://mycompany.com:443/myapp.php?foo=1&bar=2", TWILIO_PARAMS
        )
        == "kvajT1Ptam85bY51eRf/AJRuM3w="
    )


@pytest.mark.parametrize(
    ("url", "signature"),
    [
        (TWILIO_URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (TWILIO_URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # Twilio signed with :443 spelled out
        ("https://mycompany.com:1234/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    ],
)
def test_twilio_accepts_either_port_form(url: str, signature: str) -> None:
    assert signing.verify_twilio(TWILIO_TOKEN, url, TWILIO_PARAMS, signature)


def test_twilio_refuses_changed_params_or_token() -> None:
    changed = {**TWILIO_PARAMS, "Digits": ["9999"]}
    assert not signing.verify_twilio(
        TWILIO_TOKEN, TWILIO_URL, changed, "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert not signing.verify_twilio(
        "54321", TWILIO_URL, TWILIO_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )


def test_twilio_repeated_params_vector() -> None:
    params = {"Sid": ["CA123"], "SidAccount": ["AC123"], "Digits": ["5678", "1234"]}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signing.twilio_signature(TWILIO_TOKEN, url, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


# --- mapping reports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bounce", "event", "suppress"),
    [
        ("email.delivered", None, "delivered", None),
        ("email.bounced", "Permanent", "bounced", "hard_bounce"),
        ("email.bounced", "Transient", "bounced", None),
        ("email.complained", None, "complained", "complaint"),
        ("email.delivery_delayed", None, "delivery_delayed", None),
        ("email.failed", None, "delivery_failed", None),
    ],
)
def test_resend_reports(kind: str, bounce: str | None, event: str, suppress: str | None) -> None:
    data: dict[str, object] = {"email_id": "e-1", "to": ["a@b.co"]}
    if bounce:
        data["bounce"] = {"type": bounce, "subType": "General", "message": "x"}
    report = resend_report(
        {"type": kind, "created_at": "2026-01-01T00:00:00Z", "data": data}, "msg_1"
    )
    assert report is not None
    assert (report.event, report.suppress, report.provider_message_id, report.external_id) == (
        event,
        suppress,
        "e-1",
        "msg_1",
    )


def test_resend_ignores_what_we_do_not_track() -> None:
    assert resend_report({"type": "email.sent", "data": {"email_id": "e"}}, "m") is None
    assert resend_report({"type": "contact.created", "data": {}}, "m") is None
    assert resend_report({"type": "email.delivered"}, "m") is None


@pytest.mark.parametrize(
    ("item", "event", "suppress"),
    [
        ({"event": "delivered"}, "delivered", None),
        ({"event": "bounce", "type": "bounce", "reason": "550 unknown"}, "bounced", "hard_bounce"),
        ({"event": "bounce", "type": "blocked"}, "blocked", None),
        ({"event": "spamreport"}, "complained", "complaint"),
        ({"event": "unsubscribe"}, "unsubscribed", "unsubscribed"),
        ({"event": "dropped", "reason": "Bounced Address"}, "dropped", None),
    ],
)
def test_sendgrid_reports(item: dict[str, str], event: str, suppress: str | None) -> None:
    full = {
        **item,
        "sg_event_id": "ev-1",
        "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filter0001.1",
        "notification_id": "42",
        "email": "a@b.co",
    }
    report = sendgrid_report(full)
    assert report is not None
    assert (report.event, report.suppress) == (event, suppress)
    assert (report.notification_id, report.provider_message_id) == (42, "LRzXl_NHStOGhQ4kofSm_A")


def test_sendgrid_processed_and_unknown_events_are_skipped() -> None:
    assert sendgrid_report({"event": "processed", "sg_event_id": "x"}) is None
    assert sendgrid_report({"event": "delivered"}) is None  # no event id: cannot be deduplicated


@pytest.mark.parametrize(
    ("status", "code", "event", "suppress"),
    [
        ("delivered", "", "delivered", None),
        ("undelivered", "30003", "delivery_failed", None),
        ("undelivered", "30006", "delivery_failed", "invalid_number"),
        ("failed", "21610", "delivery_failed", "unsubscribed"),
    ],
)
def test_twilio_reports(status: str, code: str, event: str, suppress: str | None) -> None:
    report = twilio_report({"MessageSid": "SM1", "MessageStatus": status, "ErrorCode": code})
    assert report is not None
    assert (report.event, report.suppress, report.external_id) == (event, suppress, f"SM1:{status}")


def test_twilio_intermediate_states_are_not_recorded() -> None:
    for status in ("queued", "sending", "sent", "accepted"):
        assert twilio_report({"MessageSid": "SM1", "MessageStatus": status}) is None
