"""Standard Webhooks signatures (https://www.standardwebhooks.com, spec v1)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math

from pgnotify_worker.errors import ConfigError

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret (the prefix is optional)."""
    raw = secret.strip()
    if raw.startswith(SECRET_PREFIX):
        raw = raw[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            "webhook secret must be whsec_ followed by base64 (make one with: python -c "
            "'import os,base64;print(\"whsec_\"+base64.b64encode(os.urandom(32)).decode())')"
        ) from exc
    if len(key) < 16:
        raise ConfigError(
            "webhook secret is too short: use at least 16 random bytes (24+ recommended)"
        )
    return key


class Signer:
    """Signs with one or more keys; the keyed HMAC states are built once, copied per message."""

    def __init__(self, keys: list[bytes]) -> None:
        self._bases = [hmac.new(key, digestmod=hashlib.sha256) for key in keys]

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The webhook-signature header: `v1,<base64>` per key, space-separated (rotation)."""
        prefix = f"{msg_id}.{timestamp}.".encode()
        signatures = []
        for base in self._bases:
            mac = base.copy()
            mac.update(prefix)
            mac.update(body)
            signatures.append("v1," + base64.b64encode(mac.digest()).decode())
        return " ".join(signatures)


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header for `keys` (see Signer)."""
    return Signer(keys).sign(msg_id, timestamp, body)


def verify(keys: list[bytes], msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """True when any v1 signature in `header` matches any key (constant-time compare)."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    expected = [hmac.digest(key, to_sign, "sha256") for key in keys]
    for part in header.split():
        version, _, value = part.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, want) for want in expected):
            return True
    return False


# --- signatures of inbound provider webhooks -------------------------------------------------

SVIX_TOLERANCE = 300.0  # seconds, as Svix's own verifier
MAX_TIMESTAMP_CHARS = 20  # Unix seconds have 10 digits; room for a fraction, never 400 digits


def parse_timestamp(stamp: str) -> int | None:
    """Unix seconds from a timestamp header ('1614265330', also '1614265330.5'), or None when it
    is not one: non-ASCII, too long, not a finite number (never OverflowError or ValueError)."""
    text = stamp.strip()
    if not text or len(text) > MAX_TIMESTAMP_CHARS or not text.isascii():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value)


def verify_svix(secret: str, headers: dict[str, str], body: bytes, now: float) -> bool:
    """Resend's webhooks (Svix): HMAC-SHA256 over '{id}.{timestamp}.{body}', v1 signatures,
    a timestamp within five minutes. Header names are matched case-insensitively."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("svix-id") or lowered.get("webhook-id")
    stamp = lowered.get("svix-timestamp") or lowered.get("webhook-timestamp")
    header = lowered.get("svix-signature") or lowered.get("webhook-signature")
    if not (msg_id and stamp and header):
        return False
    if not (msg_id.isascii() and header.isascii()):
        return False  # ids and signatures are ASCII; anything else cannot be encoded to sign
    timestamp = parse_timestamp(stamp)
    if timestamp is None or abs(now - timestamp) > SVIX_TOLERANCE:
        return False
    try:
        key = decode_secret(secret)
    except ConfigError:
        return False
    return verify([key], msg_id, timestamp, body, header)


def verify_sendgrid(public_key_b64: str, signature_b64: str, timestamp: str, body: bytes) -> bool:
    """SendGrid's Signed Event Webhook: ECDSA P-256 / SHA-256 over timestamp + raw body."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - only inbound needs it
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_der_public_key  # noqa: PLC0415

    if not timestamp.isascii():
        return False  # a header value is str; non-ASCII (even undecodable) bytes are never signed
    try:
        key = load_der_public_key(base64.b64decode(public_key_b64))
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, binascii.Error):
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def twilio_signature(auth_token: str, url: str, params: dict[str, list[str]]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by each name+value, names
    sorted (twilio-python's RequestValidator)."""
    data = url
    for name in sorted(params):
        for value in sorted(set(params[name])):
            data += name + value
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio(auth_token: str, url: str, params: dict[str, list[str]], header: str) -> bool:
    """Twilio signs the URL as it called it; like its own validator, accept it with the default
    port spelled out or left out."""
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    if not header.isascii():
        return False  # base64 is ASCII; compare_digest raises TypeError on other str
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = 443 if parts.scheme == "https" else 80
    variants = {url}
    if parts.port is None:
        variants.add(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
    else:
        variants.add(urlunsplit(parts._replace(netloc=host)))
    return any(
        hmac.compare_digest(twilio_signature(auth_token, candidate, params), header)
        for candidate in variants
    )
