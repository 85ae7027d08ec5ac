"""Web Push crypto against RFC 8291's worked example, and VAPID tokens a verifier accepts."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pgnotify_worker.core import webpush
from pgnotify_worker.core.webpush import b64u, b64u_decode

# RFC 8291, section 5 (Appendix A): every value base64url without padding.
PLAINTEXT = b"When I grow up, I want to be a watermelon"
AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
UA_PUBLIC = (
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
)
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
SALT = "DGv6ra1nlYgDCS1FRnbzlw"
BODY = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8w"
    "EqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
)


def key(scalar: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64u_decode(scalar), "big"), ec.SECP256R1())


def test_encryption_matches_the_rfc_8291_example_byte_for_byte() -> None:
    body = webpush.encrypt(
        PLAINTEXT,
        b64u_decode(UA_PUBLIC),
        b64u_decode(AUTH),
        salt=b64u_decode(SALT),
        as_private=key(AS_PRIVATE),
    )
    assert b64u(body) == BODY


def test_the_user_agent_decrypts_the_rfc_example_and_fresh_messages() -> None:
    assert webpush.decrypt(b64u_decode(BODY), key(UA_PRIVATE), b64u_decode(AUTH)) == PLAINTEXT
    fresh = webpush.encrypt(b"hello", b64u_decode(UA_PUBLIC), b64u_decode(AUTH))
    assert fresh != webpush.encrypt(
        b"hello", b64u_decode(UA_PUBLIC), b64u_decode(AUTH)
    )  # new salt/key
    assert webpush.decrypt(fresh, key(UA_PRIVATE), b64u_decode(AUTH)) == b"hello"


def test_a_wrong_auth_secret_cannot_decrypt() -> None:
    body = webpush.encrypt(b"secret", b64u_decode(UA_PUBLIC), b64u_decode(AUTH))
    with pytest.raises(Exception):  # noqa: B017 - AESGCM raises InvalidTag
        webpush.decrypt(body, key(UA_PRIVATE), b"\x00" * 16)


def test_payload_limit() -> None:
    webpush.encrypt(b"x" * webpush.MAX_PLAINTEXT, b64u_decode(UA_PUBLIC), b64u_decode(AUTH))
    with pytest.raises(ValueError, match="over 3993"):
        webpush.encrypt(
            b"x" * (webpush.MAX_PLAINTEXT + 1), b64u_decode(UA_PUBLIC), b64u_decode(AUTH)
        )


def test_vapid_header_is_a_valid_es256_jwt_for_the_endpoint_origin() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    header = webpush.vapid_authorization(
        private,
        "https://push.example.net:8443/wpush/v2/abc?x=1",
        "mailto:ops@example.com",
        now=1_700_000_000,
    )
    scheme, _, rest = header.partition(" ")
    params = dict(part.strip().split("=", 1) for part in rest.split(","))
    assert scheme == "vapid"
    head, claims, signature = params["t"].split(".")
    assert json.loads(b64u_decode(head)) == {"typ": "JWT", "alg": "ES256"}
    assert json.loads(b64u_decode(claims)) == {
        "aud": "https://push.example.net:8443",
        "exp": 1_700_000_000 + 12 * 3600,
        "sub": "mailto:ops@example.com",
    }
    raw = b64u_decode(signature)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64u_decode(params["k"]))
    public.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if bad


def test_vapid_keys_load_from_pem_and_raw_base64url() -> None:
    from cryptography.hazmat.primitives import serialization

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    raw = b64u(private.private_numbers().private_value.to_bytes(32, "big"))
    for text in (pem, raw):
        loaded = webpush.load_vapid_key(text)
        assert loaded.private_numbers().private_value == private.private_numbers().private_value


@pytest.mark.parametrize(
    "subscription",
    [
        f'{{"endpoint": "http://push.example/x", "keys": {{"p256dh": "{UA_PUBLIC}", "auth": "{AUTH}"}}}}',
        f'{{"endpoint": "https://push.example/x", "keys": {{"p256dh": "AAAA", "auth": "{AUTH}"}}}}',
        f'{{"endpoint": "https://push.example/x", "keys": {{"p256dh": "{UA_PUBLIC}", "auth": "AAAA"}}}}',
        '{"endpoint": "https://push.example/x"}',
        "not json",
    ],
)
def test_bad_subscriptions_are_refused(subscription: str) -> None:
    with pytest.raises((ValueError, KeyError)):
        webpush.Subscription.parse(subscription)
