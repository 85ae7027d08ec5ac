"""User tokens for the app-facing HTTP APIs (inbox feed, preference API): a JSON Web Token
(RFC 7519) signed with HMAC-SHA256 (JWS "HS256", RFC 7515) by the app's backend with the secret
the worker knows (PGNOTIFY_APP_TOKEN_SECRET). Any JWT library makes one:

    jwt.encode({"sub": user_id, "exp": int(time.time()) + 900}, secret, "HS256")   # PyJWT
    jwt.sign({ sub: userId }, secret, { algorithm: "HS256", expiresIn: "15m" })     // jsonwebtoken

What is checked, strictly (no library, so no algorithm confusion): the header names alg HS256
(`none`, RS*/ES* and anything else is refused), the signature in constant time, `sub` a non-empty
string (the user id), `exp` present and in the future (with a small leeway for clock skew), the
lifetime no longer than the configured maximum (`exp - iat`, or `exp - now` without iat), `nbf`
when present, and `aud` when the worker is configured with one. No session store: the token is
the session."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from pgnotify_worker.errors import AppTokenError

LEEWAY_SECONDS = 30
MAX_TOKEN_BYTES = 4096


def _b64url_decode(part: str) -> bytes:
    if not part or any(c in part for c in "=+/ \t\r\n"):
        raise AppTokenError("token is not a compact JWT (base64url parts)")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AppTokenError("token is not a compact JWT (base64url parts)") from exc


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class AppToken:
    """A verified token: whose it is and until when."""

    user_id: str
    expires_at: int


def issue(secret: bytes, user_id: str, now: int, ttl_seconds: int = 900, **claims: Any) -> str:
    """A token as an app backend would make one (for our tests and the docs' example)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds, **claims}
    payload = _b64url(json.dumps(body, separators=(",", ":")).encode())
    signed = f"{header}.{payload}".encode("ascii")
    signature = _b64url(hmac.new(secret, signed, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def verify(
    secret: bytes,
    token: str,
    now: int,
    *,
    max_lifetime_seconds: int = 86_400,
    audience: str | None = None,
) -> AppToken:
    """The token's user, or AppTokenError saying what is wrong (never echoing the token)."""
    if not secret:
        raise AppTokenError("app tokens are not configured (PGNOTIFY_APP_TOKEN_SECRET is unset)")
    if len(token) > MAX_TOKEN_BYTES:
        raise AppTokenError("token is too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AppTokenError("token is not a compact JWT (header.payload.signature)")
    head_raw, body_raw, sig_raw = (_b64url_decode(p) for p in parts)
    try:
        header = json.loads(head_raw)
    except ValueError as exc:
        raise AppTokenError("token header is not JSON") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise AppTokenError("token must be signed with HS256")
    if header.get("crit"):
        raise AppTokenError("token has critical header parameters this server does not know")
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, sig_raw):
        raise AppTokenError("token signature does not match")
    try:
        claims = json.loads(body_raw)
    except ValueError as exc:
        raise AppTokenError("token payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise AppTokenError("token payload is not a JSON object")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255 or "\x00" in sub:
        raise AppTokenError("token has no valid sub (the user id)")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AppTokenError("token has no exp (tokens must expire)")
    if exp + LEEWAY_SECONDS < now:
        raise AppTokenError("token has expired")
    iat = claims.get("iat")
    start = iat if isinstance(iat, int | float) and not isinstance(iat, bool) else now
    if exp - start > max_lifetime_seconds:
        raise AppTokenError(f"token lives longer than the allowed {max_lifetime_seconds} s")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf - LEEWAY_SECONDS > now:
        raise AppTokenError("token is not valid yet")
    if audience is not None:
        aud = claims.get("aud")
        allowed = aud if isinstance(aud, list) else [aud]
        if audience not in allowed:
            raise AppTokenError("token is for another audience")
    return AppToken(user_id=sub, expires_at=int(exp))
