"""Standard Webhooks signatures (https://www.standardwebhooks.com, spec v1)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

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
