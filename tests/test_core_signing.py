"""Standard Webhooks signatures, checked against the independent `standardwebhooks` verifier."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pgnotify_worker.core.signing import decode_secret, sign, verify
from pgnotify_worker.errors import ConfigError

KEY_A = bytes(range(32))
KEY_B = hashlib.sha256(b"rotated").digest()
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
MSG_ID = "msg_2fPmDv1jZ0"
TS = 1_795_420_005  # a fixed timestamp for the pure tests
BODY = b'{"type":"invoice.paid","data":{"id":"inv_1","amount":1200,"note":"caf\xc3\xa9"}}'
SIG_RE = re.compile(r"^v1,[A-Za-z0-9+/]{43}=$")  # 32-byte HMAC-SHA256, base64


def headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_signature_format_is_v1_comma_base64_of_hmac_sha256() -> None:
    header = sign([KEY_A], MSG_ID, TS, BODY)
    assert SIG_RE.match(header), header
    expected = hmac.new(KEY_A, f"{MSG_ID}.{TS}.".encode() + BODY, hashlib.sha256).digest()
    assert base64.b64decode(header.removeprefix("v1,")) == expected


def test_signing_is_deterministic_and_depends_on_every_input() -> None:
    base = sign([KEY_A], MSG_ID, TS, BODY)
    assert sign([KEY_A], MSG_ID, TS, BODY) == base
    variants = [
        sign([KEY_B], MSG_ID, TS, BODY),
        sign([KEY_A], MSG_ID + "x", TS, BODY),
        sign([KEY_A], MSG_ID, TS + 1, BODY),
        sign([KEY_A], MSG_ID, TS, BODY + b" "),
    ]
    assert len({base, *variants}) == 5


def test_reference_verifier_accepts_our_signature() -> None:
    now = int(time.time())  # the reference checks the timestamp is within 5 minutes
    header = sign([decode_secret(SECRET_A)], MSG_ID, now, BODY)
    payload = Webhook(SECRET_A).verify(BODY, headers(MSG_ID, now, header))
    assert payload["data"]["id"] == "inv_1"


def test_rotation_sends_both_signatures_and_either_secret_verifies() -> None:
    now = int(time.time())
    header = sign([KEY_A, KEY_B], MSG_ID, now, BODY)
    parts = header.split(" ")
    assert len(parts) == 2
    assert all(SIG_RE.match(p) for p in parts)
    assert parts[0] == sign([KEY_A], MSG_ID, now, BODY)
    assert parts[1] == sign([KEY_B], MSG_ID, now, BODY)
    for secret in (SECRET_A, SECRET_B):
        Webhook(secret).verify(BODY, headers(MSG_ID, now, header))
    # our own verifier agrees, with either key alone
    assert verify([KEY_A], MSG_ID, now, BODY, header)
    assert verify([KEY_B], MSG_ID, now, BODY, header)


def test_reference_verifier_rejects_a_different_secret() -> None:
    now = int(time.time())
    header = sign([KEY_A], MSG_ID, now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(BODY, headers(MSG_ID, now, header))


def test_our_verifier_accepts_the_reference_signature() -> None:
    now = int(time.time())
    reference = Webhook(SECRET_A)
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    header = reference.sign(MSG_ID, when, BODY.decode())
    assert verify([KEY_A], MSG_ID, now, BODY, header)


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "body"),
    [
        (MSG_ID, TS, BODY.replace(b"1200", b"9200")),  # tampered body
        (MSG_ID, TS, BODY + b"\n"),
        ("msg_other", TS, BODY),  # wrong id
        (MSG_ID, TS + 1, BODY),  # wrong timestamp
        (MSG_ID, TS - 300, BODY),
    ],
)
def test_verify_rejects_tampering(msg_id: str, timestamp: int, body: bytes) -> None:
    header = sign([KEY_A], MSG_ID, TS, BODY)
    assert verify([KEY_A], MSG_ID, TS, BODY, header)
    assert not verify([KEY_A], msg_id, timestamp, body, header)


def test_verify_rejects_the_wrong_key() -> None:
    header = sign([KEY_A], MSG_ID, TS, BODY)
    assert not verify([KEY_B], MSG_ID, TS, BODY, header)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v1,",
        "v1,not base64!!",
        "v2," + base64.b64encode(b"x" * 32).decode(),
        "garbage",
        "v1a," + "A" * 44,
    ],
)
def test_verify_rejects_malformed_headers_without_raising(header: str) -> None:
    assert verify([KEY_A], MSG_ID, TS, BODY, header) is False


def test_verify_skips_unknown_versions_and_finds_the_v1_signature() -> None:
    good = sign([KEY_A], MSG_ID, TS, BODY)
    header = f"v1a,{'A' * 44} v2,xyz {good}"
    assert verify([KEY_A], MSG_ID, TS, BODY, header)


@pytest.mark.parametrize(
    "secret",
    [
        SECRET_A,
        SECRET_A.removeprefix("whsec_"),  # no prefix
        SECRET_A.rstrip("="),  # unpadded base64
        SECRET_A.removeprefix("whsec_").rstrip("="),
        f"  {SECRET_A}\n",  # pasted with whitespace
    ],
)
def test_decode_secret_accepts_prefix_optional_and_unpadded(secret: str) -> None:
    assert decode_secret(secret) == KEY_A


def test_decode_secret_matches_the_reference_decoding() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdefXYZ").decode().rstrip("=")
    key = decode_secret(secret)
    assert key == b"0123456789abcdefXYZ"
    now = int(time.time())
    Webhook(secret).verify(BODY, headers(MSG_ID, now, sign([key], MSG_ID, now, BODY)))


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_not base64!!",
        "whsec_***",
        "whsec_abc$def",
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 12).decode(),  # url-safe alphabet
    ],
)
def test_decode_secret_rejects_non_base64(secret: str) -> None:
    with pytest.raises(ConfigError, match="base64"):
        decode_secret(secret)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "whsec_",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_" + base64.b64encode(b"x" * 15).decode(),
    ],
)
def test_decode_secret_rejects_too_short_secrets(secret: str) -> None:
    with pytest.raises(ConfigError, match="too short"):
        decode_secret(secret)


def test_decode_secret_accepts_exactly_sixteen_bytes() -> None:
    assert decode_secret("whsec_" + base64.b64encode(b"y" * 16).decode()) == b"y" * 16


def test_config_error_does_not_echo_the_secret() -> None:
    secret = "whsec_TopSecretValue!!"
    with pytest.raises(ConfigError) as info:
        decode_secret(secret)
    assert "TopSecretValue" not in str(info.value)
