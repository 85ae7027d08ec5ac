"""App user tokens (HS256 JWTs): what the inbox and preference APIs accept, and every way a token
can be wrong. Cross-checked against an independent encoder (PyJWT-compatible compact form)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from pgnotify_worker.core import app_tokens
from pgnotify_worker.errors import AppTokenError

SECRET = b"s3cret-for-tests-0123456789abcdef"
NOW = 1_800_000_000


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, object], claims: dict[str, object], key: bytes = SECRET) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def test_a_token_made_the_documented_way_names_its_user() -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, {"sub": "ada", "exp": NOW + 900})
    verified = app_tokens.verify(SECRET, token, NOW)
    assert verified.user_id == "ada"
    assert verified.expires_at == NOW + 900
    assert app_tokens.verify(SECRET, app_tokens.issue(SECRET, "bob", NOW), NOW).user_id == "bob"


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (forge({"alg": "HS256"}, {"sub": "ada", "exp": NOW + 60}, key=b"another-key"), "signature"),
        (forge({"alg": "none"}, {"sub": "ada", "exp": NOW + 60}), "HS256"),
        (forge({"alg": "RS256"}, {"sub": "ada", "exp": NOW + 60}), "HS256"),
        (forge({"alg": "HS256"}, {"sub": "ada"}), "exp"),
        (forge({"alg": "HS256"}, {"sub": "ada", "exp": NOW - 3600}), "expired"),
        (forge({"alg": "HS256"}, {"sub": "", "exp": NOW + 60}), "sub"),
        (forge({"alg": "HS256"}, {"sub": 7, "exp": NOW + 60}), "sub"),
        (forge({"alg": "HS256"}, {"sub": "ada", "exp": NOW + 10 * 86_400}), "longer"),
        (
            forge({"alg": "HS256"}, {"sub": "ada", "exp": NOW + 60, "nbf": NOW + 600}),
            "not valid yet",
        ),
        (forge({"alg": "HS256", "crit": ["x"]}, {"sub": "ada", "exp": NOW + 60}), "critical"),
        ("abc.def", "compact"),
        ("a.b.c.d", "compact"),
        ("x" * 5000, "too long"),
    ],
)
def test_a_wrong_token_is_refused_with_the_reason(token: str, why: str) -> None:
    with pytest.raises(AppTokenError, match=why):
        app_tokens.verify(SECRET, token, NOW)


def test_a_tampered_payload_is_refused_even_with_a_valid_signature_elsewhere() -> None:
    ada = app_tokens.issue(SECRET, "ada", NOW)
    bob = app_tokens.issue(SECRET, "bob", NOW)
    spliced = ".".join([ada.split(".")[0], bob.split(".")[1], ada.split(".")[2]])
    with pytest.raises(AppTokenError, match="signature"):
        app_tokens.verify(SECRET, spliced, NOW)


def test_audience_is_checked_when_configured() -> None:
    token = app_tokens.issue(SECRET, "ada", NOW, aud="inbox")
    assert app_tokens.verify(SECRET, token, NOW, audience="inbox").user_id == "ada"
    with pytest.raises(AppTokenError, match="audience"):
        app_tokens.verify(SECRET, token, NOW, audience="admin")


def test_no_secret_configured_refuses_everything() -> None:
    with pytest.raises(AppTokenError, match="PGNOTIFY_APP_TOKEN_SECRET"):
        app_tokens.verify(b"", app_tokens.issue(SECRET, "ada", NOW), NOW)
