"""Web Push message encryption (RFC 8291 over RFC 8188 aes128gcm) and VAPID (RFC 8292). Pure."""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported where used: cryptography costs ~7 MB of RSS in every worker
    from cryptography.hazmat.primitives.asymmetric import ec

RECORD_SIZE = 4096
MAX_PLAINTEXT = RECORD_SIZE - 86 - 16 - 1  # header, GCM tag, padding delimiter: one record


def b64u_decode(text: str) -> bytes:
    """Base64url without padding (as browsers give the subscription keys)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, hmac  # noqa: PLC0415

    mac = hmac.HMAC(salt, hashes.SHA256())
    mac.update(ikm)
    return mac.finalize()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes, hmac  # noqa: PLC0415

    mac = hmac.HMAC(prk, hashes.SHA256())
    mac.update(info + b"\x01")
    return mac.finalize()[:length]  # one block: every output here is at most 32 bytes


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass(frozen=True)
class Subscription:
    """What PushManager.subscribe() gives the browser: endpoint, p256dh key, auth secret."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    @classmethod
    def parse(cls, text: str) -> Subscription:
        """From the JSON a page stores: {"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}}."""
        data = json.loads(text)
        keys = data["keys"]
        subscription = cls(data["endpoint"], b64u_decode(keys["p256dh"]), b64u_decode(keys["auth"]))
        if len(subscription.p256dh) != 65 or subscription.p256dh[0] != 4:
            raise ValueError("p256dh is not an uncompressed P-256 public key")
        if len(subscription.auth) != 16:
            raise ValueError("auth must be 16 bytes")
        if urlsplit(subscription.endpoint).scheme != "https":
            raise ValueError("the endpoint must be https")
        return subscription


def encrypt(
    plaintext: bytes,
    ua_public: bytes,
    auth_secret: bytes,
    *,
    salt: bytes | None = None,
    as_private: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """The aes128gcm body for one push message (salt and sender key are fresh unless given)."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"push payload is {len(plaintext)} bytes, over {MAX_PLAINTEXT}")
    salt = salt or os.urandom(16)
    as_private = as_private or ec.generate_private_key(ec.SECP256R1())
    as_public = _public_bytes(as_private.public_key())
    receiver = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    shared = as_private.exchange(ec.ECDH(), receiver)
    prk_key = _hkdf_extract(auth_secret, shared)
    ikm = _hkdf_expand(prk_key, b"WebPush: info\x00" + ua_public + as_public, 32)
    prk = _hkdf_extract(salt, ikm)
    cek = _hkdf_expand(prk, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf_expand(prk, b"Content-Encoding: nonce\x00", 12)
    ciphertext = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    header = salt + struct.pack("!LB", RECORD_SIZE, len(as_public)) + as_public
    return header + ciphertext


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth_secret: bytes) -> bytes:
    """The user agent's side (tests and fake push services use it)."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    salt, (_rs, idlen) = body[:16], struct.unpack("!LB", body[16:21])
    as_public, ciphertext = body[21 : 21 + idlen], body[21 + idlen :]
    ua_public = _public_bytes(ua_private.public_key())
    sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public)
    shared = ua_private.exchange(ec.ECDH(), sender)
    ikm = _hkdf_expand(
        _hkdf_extract(auth_secret, shared), b"WebPush: info\x00" + ua_public + as_public, 32
    )
    prk = _hkdf_extract(salt, ikm)
    cek = _hkdf_expand(prk, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf_expand(prk, b"Content-Encoding: nonce\x00", 12)
    padded = AESGCM(cek).decrypt(nonce, ciphertext, None).rstrip(b"\x00")
    if not padded.endswith(b"\x02"):
        raise ValueError("not a final aes128gcm record")
    return padded[:-1]


def load_vapid_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A VAPID private key: PEM, or the raw 32-byte scalar in base64url (as web-push CLIs print)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = ec.derive_private_key(int.from_bytes(b64u_decode(text), "big"), ec.SECP256R1())
    except (ValueError, TypeError):
        raise ValueError("a VAPID key must be a P-256 private key (PEM or raw base64url)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("a VAPID key must be a P-256 private key")
    return key


def vapid_authorization(
    key: ec.EllipticCurvePrivateKey,
    endpoint: str,
    subject: str,
    now: int,
    lifetime: int = 12 * 3600,
) -> str:
    """Authorization: vapid t=<ES256 JWT for the endpoint's origin>, k=<public key>."""
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: PLC0415
        decode_dss_signature,
    )

    parts = urlsplit(endpoint)
    audience = f"{parts.scheme}://{parts.netloc}"
    header = b64u(json.dumps({"typ": "JWT", "alg": "ES256"}, separators=(",", ":")).encode())
    claims = json.dumps(
        {"aud": audience, "exp": now + lifetime, "sub": subject},
        separators=(",", ":"),
        sort_keys=True,
    )
    signing_input = f"{header}.{b64u(claims.encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS ES256: raw r||s, not DER
    public = b64u(_public_bytes(key.public_key()))
    return f"vapid t={signing_input}.{b64u(signature)}, k={public}"
