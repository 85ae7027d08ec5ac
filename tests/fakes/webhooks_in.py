"""Signing helpers for inbound provider events (research: email_providers.md §2.4, §4.4).

- Resend delivers events through Svix: `svix_headers(...)`.
- SendGrid's Signed Event Webhook: `SendGridSigner` (ECDSA P-256 / SHA-256, DER, base64).
- Twilio status callbacks: see `tests.fakes.twilio.twilio_signature` / `post_status_callback`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"


def svix_signature(secret_whsec: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`; key = b64decode(secret
    without the `whsec_` prefix)."""
    key = base64.b64decode(secret_whsec.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def svix_headers(
    secret_whsec: str,
    body: bytes,
    msg_id: str | None = None,
    timestamp: int | None = None,
    *,
    extra_secrets: Sequence[str] = (),
) -> dict[str, str]:
    """The `svix-id`, `svix-timestamp` and `svix-signature` headers Resend sends with `body`.

    `extra_secrets` add more space-separated `v1,` entries (as during secret rotation)."""
    msg_id = msg_id or "msg_" + secrets.token_urlsafe(20).replace("-", "").replace("_", "")[:27]
    ts = int(time.time()) if timestamp is None else int(timestamp)
    signatures = [svix_signature(s, msg_id, ts, body) for s in (secret_whsec, *extra_secrets)]
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(ts),
        "svix-signature": " ".join(signatures),
    }


async def post_webhook(
    url: str, body: bytes, headers: Mapping[str, str], *, timeout: float = 10.0
) -> tuple[int, str]:
    """POST `body` as `application/json` with the given (signature) headers; (status, text)."""
    all_headers = {"Content-Type": "application/json", "User-Agent": "fake-provider/1.0"}
    all_headers.update(headers)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(url, data=body, headers=all_headers) as response,
    ):
        return response.status, await response.text()


def resend_event(
    event_type: str, email_id: str, *, created_at: str | None = None, **data: Any
) -> dict[str, Any]:
    """A Resend webhook envelope `{"type", "created_at", "data": {"email_id", ...}}`."""
    now = created_at or time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    payload: dict[str, Any] = {
        "email_id": email_id,
        "created_at": now,
        "from": "Acme <no-reply@example.com>",
        "to": ["user@example.com"],
        "subject": "Hi",
    }
    payload.update(data)
    return {"type": event_type, "created_at": now, "data": payload}


class SendGridSigner:
    """Signs SendGrid Event Webhook posts with a fresh P-256 key.

    `public_key_b64` is what SendGrid shows as the verification key: base64 of the DER
    SubjectPublicKeyInfo (it starts with `MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE`)."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_b64 = base64.b64encode(der).decode()

    def sign(self, body: bytes, timestamp: int | str) -> str:
        """base64(DER ECDSA-SHA256 over `timestamp + body`)."""
        signature = self.private_key.sign(str(timestamp).encode() + body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else int(timestamp))
        return {
            SENDGRID_SIGNATURE: self.sign(body, ts),
            SENDGRID_TIMESTAMP: ts,
        }

    @staticmethod
    def body(events: Sequence[Mapping[str, Any]]) -> bytes:
        """A JSON array of events the way SendGrid posts it (ending in CRLF, which is signed)."""
        return json.dumps(list(events), separators=(",", ":")).encode() + b"\r\n"


def sendgrid_event(
    event: str, message_id: str, email_addr: str = "user@example.com", **fields: Any
) -> dict[str, Any]:
    """One SendGrid event; `message_id` is the X-Message-Id, extended into `sg_message_id`.
    Extra keyword fields (e.g. custom args, `reason`, `type`) are top-level keys."""
    out: dict[str, Any] = {
        "email": email_addr,
        "timestamp": int(time.time()),
        "smtp-id": f"<{message_id}@ismtpd0001p1iad1.sendgrid.net>",
        "event": event,
        "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
        "sg_message_id": f"{message_id}.filterdrecv-5645d9c87f-abcde-1-5F5FC76C-9.0",
    }
    out.update(fields)
    return out


def verify_sendgrid(public_key_b64: str, signature_b64: str, timestamp: str, body: bytes) -> bool:
    """The verification SendGrid's SDKs do (used to check the published test vectors)."""
    key = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(
            base64.b64decode(signature_b64), timestamp.encode() + body, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return False
    return True
