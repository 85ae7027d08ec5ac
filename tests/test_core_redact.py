"""Masking of recipients and scrubbing of secrets, emails and phone numbers from free text."""

from __future__ import annotations

import base64
import json
import re
import time
from urllib.parse import quote, quote_plus

import pytest

from pgnotify_worker.core.redact import (
    CODE_LIMIT,
    CUT_MARKER,
    MAX_INPUT,
    Scrubber,
    mask_email,
    mask_phone,
    mask_recipient,
    mask_token,
    mask_url,
    scrub,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", "a***@e***.com"),
        ("bob.smith+tag@mail.example.org", "b***@m***.org"),
        ("x@y.io", "x***@y***.io"),
        ("carol@sub.example.co.uk", "c***@s***.uk"),
        ("not-an-email", "***"),
        ("", "***"),
    ],
)
def test_mask_email(address: str, expected: str) -> None:
    assert mask_email(address) == expected


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+14155550123", "+*******0123"),
        ("+44 20 7946 0958", "+********0958"),
        ("4155550123", "******0123"),
        ("+12", "+**"),
        ("", "**"),
    ],
)
def test_mask_phone_keeps_only_the_last_four_digits(number: str, expected: str) -> None:
    assert mask_phone(number) == expected


def test_mask_phone_never_reveals_a_short_number() -> None:
    assert "1234" not in mask_phone("+1234")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hooks.example.com/in/T0K3N?sig=abc#frag", "https://hooks.example.com/…"),
        ("https://user:pa55w0rd@hooks.example.com:8443/p/x", "https://hooks.example.com:8443/…"),
        ("http://10.0.0.7/webhook", "http://10.0.0.7/…"),
        ("https://hooks.example.com", "https://hooks.example.com/…"),
    ],
)
def test_mask_url_keeps_scheme_host_and_port_only(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    for secret in ("T0K3N", "sig=abc", "pa55w0rd", "user", "/in/", "/p/x"):
        assert secret not in masked


@pytest.mark.parametrize(
    ("token", "expected"),
    [("fcm-device-token-123456", "fcm-…"), ("user_42", "user…"), ("abcd", "…"), ("", "…")],
)
def test_mask_token_keeps_the_first_four_characters(token: str, expected: str) -> None:
    assert mask_token(token) == expected


@pytest.mark.parametrize(
    ("channel", "recipient", "expected"),
    [
        ("email", "alice@example.com", "a***@e***.com"),
        ("sms", "+14155550123", "+*******0123"),
        ("webhook", "https://hooks.example.com/secret-path?t=1", "https://hooks.example.com/…"),
        ("push", "fcm-device-token-123456", "fcm-…"),
        ("inapp", "user_42", "user…"),
    ],
)
def test_mask_recipient_by_channel(channel: str, recipient: str, expected: str) -> None:
    assert mask_recipient(channel, recipient) == expected


@pytest.mark.parametrize("url", ["http://hooks.example.com:99999/x", "http://h:-1/"])
def test_mask_url_never_raises_on_a_bad_port(url: str) -> None:
    masked = mask_recipient("webhook", url)
    assert "/x" not in masked


def test_mask_url_of_unparseable_url_is_a_placeholder() -> None:
    assert mask_url("http://[::1/x") == "<url>"


SECRETS = ["sk_live_abcdef12", "whsec_c2VjcmV0LXZhbHVlLTEyMzQ1Ng==", "hunter2pw"]


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("auth failed with sk_live_abcdef12 for x", "sk_live_abcdef12"),
        ("secret=whsec_c2VjcmV0LXZhbHVlLTEyMzQ1Ng== bad", "c2VjcmV0LXZhbHVlLTEyMzQ1Ng"),
        ("postgresql://app:hunter2pw@db:5432/app refused", "hunter2pw"),
        ("hunter2pwhunter2pw twice", "hunter2pw"),
    ],
)
def test_scrub_removes_secret_values(text: str, gone: str) -> None:
    scrubbed = scrub(text, SECRETS)
    assert gone not in scrubbed
    assert "***" in scrubbed


def test_scrub_ignores_secrets_shorter_than_six_characters() -> None:
    # Short values would shred ordinary words; they are not scrubbed.
    assert scrub("the abc token and x", ["abc", "", "x"]) == "the abc token and x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("to alice.smith@example.com failed", "to a***@e***.com failed"),
        ("cc: bob@mail.example.org, carol@x.io", "cc: b***@m***.org, c***@x***.io"),
        ("call +1 (415) 555-0123 now", "call +*******0123 now"),
        ("sms to +14155550123.", "sms to +*******0123."),
        ("+447946095812", "+********5812"),
    ],
)
def test_scrub_masks_emails_and_e164_numbers(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "worker vm-6745-7321e8 started",
        "claimed at 2026-11-23 07:46:45 by worker",
        "ts 2026-11-23T07:46:45.123+00:00",
        "Date: Mon, 23 Nov 2026 07:46:45 +0000",
        "notification 123456789 attempt 3",
        "uid 0192f1c4-7d3e-7a6b-9c1d-2e3f4a5b6c7d",
        "order #4155550123 total 12.50",
        "pid 4821 host ip-10-0-1-23.ec2.internal",
        "version 1.2.3-rc.1, 50 in flight",
    ],
)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text, SECRETS) == text


# --- Scrubber: every configured secret in every encoding ------------------------------------------

RESEND = "re_CANARYresendKEY123456"
SENDGRID = "SG.CANARYsendgrid.KEY"
TWILIO_SID = "AC" + "7" * 32
TWILIO_TOKEN = "CANARYtwilioTOKEN0123456789abcd"
SMTP_USER = "mailer@acme.test"
SMTP_PASSWORD = "CANARYsmtpPASS/+=x"
WEBHOOK_KEY = base64.b64encode(b"CANARY-webhook-key-0123456789").decode()
WEBHOOK = f"whsec_{WEBHOOK_KEY}"
DSN = "postgresql://app:CANARYdbPASS42@db.internal:5432/app"
PEM_BODY = base64.b64encode(b"CANARY private key material " * 6).decode()
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    + "\n".join(PEM_BODY[i : i + 64] for i in range(0, len(PEM_BODY), 64))
    + "\n-----END PRIVATE KEY-----\n"
)
SERVICE_ACCOUNT = json.dumps(
    {"type": "service_account", "project_id": "demo", "private_key": PEM, "client_email": "x@y.z"}
)
RAW_SECRETS = [RESEND, SENDGRID, TWILIO_TOKEN, SMTP_PASSWORD, WEBHOOK, DSN, SERVICE_ACCOUNT]
PAIRS = [(TWILIO_SID, TWILIO_TOKEN), (SMTP_USER, SMTP_PASSWORD)]
SCRUBBER = Scrubber(
    [*RAW_SECRETS, WEBHOOK_KEY, "CANARYdbPASS42"],  # as Settings.secret_values() yields them
    PAIRS,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def encodings(secret: str) -> dict[str, str]:
    """The forms a secret takes in provider echoes."""
    return {
        "raw": secret,
        "quote": quote(secret, safe=""),
        "quote_plus": quote_plus(secret),
        "json": json.dumps(secret)[1:-1],
        "b64": b64(secret),
        "b64_nopad": b64(secret).rstrip("="),
        "b64url": base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
    }


def canary_cases() -> list[tuple[str, str]]:
    cases = []
    for secret in (RESEND, SENDGRID, TWILIO_TOKEN, SMTP_PASSWORD, WEBHOOK_KEY):
        for kind, form in encodings(secret).items():
            cases.append((f"{secret[:10]}-{kind}", form))
    basic_twilio = b64(f"{TWILIO_SID}:{TWILIO_TOKEN}")
    basic_smtp = b64(f"{SMTP_USER}:{SMTP_PASSWORD}")
    cases += [
        ("twilio-basic", basic_twilio),
        ("twilio-basic-urlsafe", basic_twilio.translate(str.maketrans("+/", "-_"))),
        ("smtp-basic", basic_smtp),
        ("smtp-plain-auth", b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}")),  # AUTH PLAIN
        ("resend-in-b64-json", b64(json.dumps({"Authorization": f"Bearer {RESEND}"}))),
        ("pem-line", PEM_BODY[64:128]),
        ("pem-json", json.dumps(PEM)[1:-1]),
        ("service-account", SERVICE_ACCOUNT),
        ("service-account-quoted", quote(SERVICE_ACCOUNT, safe="")),
        ("dsn-password", "CANARYdbPASS42"),
    ]
    return cases


@pytest.mark.parametrize(("name", "form"), canary_cases(), ids=[c[0] for c in canary_cases()])
def test_scrubber_removes_a_secret_in_any_encoding_and_context(name: str, form: str) -> None:
    for text in (
        f"provider said: {form}",
        f'{{"echo":"{form}","status":422}}',
        f"to=x&key={form}&y=1",
        f"{form}",
        f"error({form})",
    ):
        cleaned = SCRUBBER.clean(text, limit=None)
        assert form not in cleaned, (name, text, cleaned)
    if name.rsplit("-", maxsplit=1)[-1] in ("raw", "quote", "quote_plus", "json", "b64", "b64url"):
        # a secret's own encoding goes whole: no fragment of 12 characters is left
        cleaned = SCRUBBER.clean(f"x {form} y", limit=None)
        assert all(form[i : i + 12] not in cleaned for i in range(len(form) - 11)), cleaned
    else:
        # inside a longer encoding (user:secret, a JSON document) the characters that encode
        # the secret go; those of the user name may stay
        assert "***" in SCRUBBER.clean(form) or "<private key>" in SCRUBBER.clean(form)


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("Authorization: Bearer sk_unknown_0123456789", "sk_unknown_0123456789"),
        ('{"authorization": "Basic dXNlcjpwYXNzd29yZDEyMw=="}', "dXNlcjpwYXNzd29yZDEyMw"),
        ("headers: authorization=Basic%20dXNlcjpwYXNzd29yZDEyMw%3D%3D", "dXNlcjpwYXNzd29yZDEy"),
        ("got bearer ya29.a0AfH6SMBx-unknown-token", "ya29.a0AfH6SMBx"),
        ("x-api-key: key-4f3c2b1a0987", "key-4f3c2b1a0987"),
        ("password=hunter2hunter2&user=x", "hunter2hunter2"),
        ('"access_token": "ya29.c.KqKB-unknown"', "ya29.c.KqKB"),
        ("client_secret=GOCSPX-abcdefghijkl", "GOCSPX-abcdefghijkl"),
        (
            "assertion=eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ4QHkueiJ9.c2lnbmF0dXJlMTIz",
            "eyJpc3MiOiJ4QHkueiJ9",
        ),
        ("jwt eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ4In0.sig_-123 end", "eyJhbGciOiJSUz"),
        ("truncated eyJhbGciOiJSUzI1NiIsInR5cCI6Ikp", "eyJhbGciOiJSUz"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAunknownkey\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEAunknownkey",
        ),
        ("cut -----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0B", "MIIEvQIBADANBgkqhkiG9w0B"),
        ('{"private_key": "MIIEvQIBADANBgk\\nqhkiG9w0B", "id": 1}', "MIIEvQIBADANBgk"),
        ("to ada.lovelace@example.com failed", "ada.lovelace@example.com"),
        ("to=ada.lovelace%40example.com&x=1", "ada.lovelace%40example.com"),
        ("double ada.lovelace%2540example.com", "lovelace%2540example"),
        ('{"to": "ada\\u0040example.com"}', "ada\\u0040example"),
        ("To=%2B15005550199&From=x", "15005550199"),
        ("To=+15005550199&From=x", "15005550199"),
        ('"to": "15005550199"', "15005550199"),
        ('{"to": ["15005550199"]}', "15005550199"),
        ("number +1 (500) 555-0199 is not valid", "555-0199"),
        ("whatsapp:+15005550199", "15005550199"),
        ('{"message": {"token": "fcm-device-TOKEN:APA91b-xyz", "data": {}}}', "APA91b-xyz"),
        ('{\\"token\\": \\"fcm-device-TOKEN:APA91b-xyz\\"}', "APA91b-xyz"),
        ('{"endpoint": "https://fcm.googleapis.com/fcm/send/dXyZ123", "keys": {}}', "dXyZ123"),
        ('"keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA", "auth": "tBHI"}', "BNcRdre"),
    ],
)
def test_scrubber_removes_credentials_jwts_keys_and_addresses(text: str, gone: str) -> None:
    cleaned = SCRUBBER.clean(text, limit=None)
    assert gone not in cleaned, cleaned


@pytest.mark.parametrize(
    "text",
    [
        "resend invalid_request: The `to` field is missing",
        "resend validation_error",
        "twilio 21211: Invalid 'To' Phone Number",
        "HTTP 429 Too Many Requests",
        "HTTP 503 Service Unavailable; retry after 30 seconds",
        "sendgrid HTTP 401: The provided authorization grant is invalid, expired, or revoked",
        "fcm UNREGISTERED: token no longer valid",
        "fcm INVALID_ARGUMENT: The registration token is not a valid FCM registration token",
        "smtp 535: 5.7.8 Authentication credentials invalid",
        "Basic authentication failed",
        "bearer token expired",
        "webhook 127.0.0.1 answered HTTP 500",
        "template_variable: body: 'name' is undefined",
        "order #4155550123 total 12.50 at 2026-11-23T07:46:45+00:00",
        "lease of worker vm-6745-7321e8 expired during attempt 3",
    ],
)
def test_scrubber_leaves_error_codes_statuses_and_numbers_alone(text: str) -> None:
    assert SCRUBBER.clean(text) == text


def test_scrubber_removes_a_secret_cut_in_half_at_the_end() -> None:
    # providers cap a message at 300 characters before it reaches the scrubber
    for keep in (6, 12, len(RESEND) - 1):
        cleaned = SCRUBBER.clean(f"resend validation_error: {RESEND[:keep]}", limit=None)
        assert RESEND[:keep] not in cleaned
        assert cleaned.startswith("resend validation_error: ")


def test_scrubber_caps_the_length_with_a_marker() -> None:
    cleaned = SCRUBBER.clean("x" * 2000, limit=500)
    assert len(cleaned) == 500
    assert cleaned.endswith(CUT_MARKER)
    assert SCRUBBER.clean("short", limit=500) == "short"
    assert len(SCRUBBER.clean("y" * 100_000, limit=None)) <= MAX_INPUT


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("resend_invalid_api_key", "resend_invalid_api_key"),
        ("twilio_21211", "twilio_21211"),
        ("http_503", "http_503"),
        ("fcm_UNREGISTERED", "fcm_UNREGISTERED"),
        (f"resend_Bearer {RESEND}", "resend_Bearer"),
        ("resend_The key is invalid!", "resend_The_key_is_invalid"),
        ("sendgrid_ada@example.com", "s_e_.com"),  # the email, whole, is masked
        ("x" * 200, "x" * CODE_LIMIT),
        ("***", "error"),
        (None, None),
    ],
)
def test_scrubber_code_is_a_short_token(code: str | None, expected: str | None) -> None:
    cleaned = SCRUBBER.code(code)
    assert cleaned == expected
    if cleaned is not None:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cleaned)


def test_scrubber_tree_cleans_nested_strings_and_keeps_keys() -> None:
    document = {
        "circuits": {"resend": {"last_failure": f"resend: Bearer {RESEND}", "failures": 3}},
        "errors": [f"to ada@example.com key {SENDGRID}", None, 1.5],
    }
    cleaned = SCRUBBER.tree(document)
    text = json.dumps(cleaned)
    assert RESEND not in text and SENDGRID not in text and "ada@example.com" not in text
    assert cleaned["circuits"]["resend"]["failures"] == 3
    assert cleaned["errors"][1:] == [None, 1.5]


def test_scrubber_is_one_precompiled_pass() -> None:
    many = Scrubber([f"CANARY-secret-number-{i:04d}-xyz" for i in range(200)])
    text = (
        "provider echo: "
        + " ".join(f"word{i}" for i in range(60))
        + " CANARY-secret-number-0150-xyz"
    )
    started = time.perf_counter()
    for _ in range(200):
        cleaned = many.clean(text)
    per_call = (time.perf_counter() - started) / 200
    assert "CANARY-secret-number-0150-xyz" not in cleaned
    assert per_call < 0.005  # generous for a shared CI machine; ~0.1 ms here


@pytest.mark.parametrize(
    "text",
    [
        "Body=Order+7+shipped+to+%2B15005550199.",
        "Body=shipped%20to%20%2B15005550199",
        "text=call+%2B1+500+555+0199",
        '{"body": "to \\u002b15005550199"}',
    ],
)
def test_scrubber_masks_url_encoded_numbers_in_form_bodies(text: str) -> None:
    cleaned = SCRUBBER.clean(text)
    assert "5005550199" not in cleaned
    assert "0199" in cleaned  # the last four digits, as mask_phone keeps them


def test_scrubber_outcome_cleans_code_and_message_and_keeps_the_rest() -> None:
    from pgnotify_worker.models import Permanent, Retryable, Sent

    retry = Retryable(
        f"resend_{RESEND}", f"echo Bearer {RESEND} to ada@example.com", 3.0, trip=True
    )
    cleaned = SCRUBBER.outcome(retry)
    assert isinstance(cleaned, Retryable)
    assert (cleaned.retry_after, cleaned.trip) == (3.0, True)
    assert RESEND not in cleaned.code + cleaned.message
    assert "ada@example.com" not in cleaned.message
    permanent = SCRUBBER.outcome(Permanent("twilio_21211", "bad", suppress="invalid_number"))
    assert permanent == Permanent("twilio_21211", "bad", suppress="invalid_number")
    sent = Sent("id-1")
    assert SCRUBBER.outcome(sent) is sent
