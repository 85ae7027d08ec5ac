"""Signed, expiring unsubscribe tokens: user x category (or everything). Pure."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

VERSION = "u1"
ALL = "*"  # the category of a link that unsubscribes from everything (but critical)
MAX_TOKEN_CHARS = 4096  # a real token is ~100-300 characters; URLs past 8 KiB break anyway


class TokenInvalid(ValueError):
    """Tampered, malformed or expired; the message says which, for the page shown."""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """What a valid token asks for."""

    user_id: str
    category: str  # ALL for a global unsubscribe


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> str:
    return _b64(hmac.digest(key, f"{VERSION}.{body}".encode(), hashlib.sha256))


def make_token(key: bytes, user_id: str, category: str | None, expires: int) -> str:
    """u1.<user>.<category>.<expiry epoch>.<HMAC-SHA256>: opaque to the reader, no email in it."""
    body = f"{_b64(user_id.encode())}.{_b64((category or ALL).encode())}.{expires}"
    return f"{VERSION}.{body}.{_mac(key, body)}"


def read_token(key: bytes, token: str, now: int) -> Unsubscribe:
    """The request in a valid token, or TokenInvalid."""
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise TokenInvalid("this unsubscribe link is malformed")  # compare_digest needs ASCII
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != VERSION:
        raise TokenInvalid("this unsubscribe link is incomplete")
    body = ".".join(parts[1:4])
    if not hmac.compare_digest(_mac(key, body), parts[4]):
        raise TokenInvalid("this unsubscribe link has been altered")
    try:
        user = _unb64(parts[1]).decode()
        category = _unb64(parts[2]).decode()
        expires = int(parts[3])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TokenInvalid("this unsubscribe link is malformed") from None
    if expires < now:
        raise TokenInvalid("this unsubscribe link has expired")
    return Unsubscribe(user, category)
