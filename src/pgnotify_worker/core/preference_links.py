"""Signed, expiring preference-centre links and the page's CSRF tokens. Pure.

They are signed with the unsubscribe key (PGNOTIFY_UNSUBSCRIBE_SECRET) but never with it directly:
each purpose MACs with its own key derived from it (HMAC(secret, purpose)), and the token says its
version, so an unsubscribe token is never a preference token, a preference token never an
unsubscribe token, and a CSRF token is neither."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

VERSION = "p1"
MAX_TOKEN_CHARS = 2048
CSRF_SECONDS = 4 * 3600  # a page left open this long must be reloaded before saving


class LinkInvalid(ValueError):
    """Tampered, malformed or expired; the message says which, for the page shown."""


@dataclass(frozen=True, slots=True)
class PreferenceLink:
    """What a valid link opens: one user's preferences, until `expires`."""

    user_id: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def purpose_key(key: bytes, purpose: str) -> bytes:
    """A key of its own for each use of the one configured secret."""
    return hmac.digest(key, f"pgnotify {purpose}".encode(), hashlib.sha256)


def _mac(key: bytes, purpose: str, body: str) -> str:
    return _b64(hmac.digest(purpose_key(key, purpose), body.encode(), hashlib.sha256))


def make_token(key: bytes, user_id: str, expires: int) -> str:
    """p1.<user>.<expiry epoch>.<HMAC-SHA256>: no address in it."""
    body = f"{VERSION}.{_b64(user_id.encode())}.{expires}"
    return f"{body}.{_mac(key, 'preference link', body)}"


def read_token(key: bytes, token: str, now: int) -> PreferenceLink:
    """The user of a valid link, or LinkInvalid."""
    if not token:
        raise LinkInvalid("this preferences link has no token")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise LinkInvalid("this preferences link is malformed")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION:
        raise LinkInvalid("this is not a preferences link, or it is incomplete")
    body = ".".join(parts[:3])
    if not hmac.compare_digest(_mac(key, "preference link", body), parts[3]):
        raise LinkInvalid("this preferences link has been altered")
    try:
        user = _unb64(parts[1]).decode()
        expires = int(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise LinkInvalid("this preferences link is malformed") from None
    if not user:
        raise LinkInvalid("this preferences link is malformed")
    if expires < now:
        raise LinkInvalid("this preferences link has expired")
    return PreferenceLink(user, expires)


def make_csrf(key: bytes, token: str, now: int) -> str:
    """The page's form token: bound to its link and to when the page was shown."""
    return f"{now}.{_mac(key, 'preference csrf', f'{token}.{now}')}"


def csrf_ok(key: bytes, token: str, csrf: str, now: int) -> bool:
    """Was `csrf` issued for this link's page, in the last CSRF_SECONDS?"""
    issued, _, mac = csrf.partition(".")
    if not issued.isdigit() or len(issued) > 12 or not mac.isascii():
        return False
    if not hmac.compare_digest(_mac(key, "preference csrf", f"{token}.{issued}"), mac):
        return False
    return now - CSRF_SECONDS <= int(issued) <= now + 60
