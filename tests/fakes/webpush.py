"""A push service (RFC 8030) that checks VAPID and decrypts what it receives, as a browser would."""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pgnotify_worker.core import webpush
from pgnotify_worker.core.webpush import b64u, b64u_decode
from tests.fakes.base import FakeServer, Recorded


class Browser:
    """A subscribed browser: its P-256 key pair and auth secret, for one endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = secrets.token_bytes(16)
        self.endpoint = endpoint

    def subscription(self) -> str:
        """The JSON PushManager.subscribe() hands the page (and the page hands to us)."""
        from cryptography.hazmat.primitives import serialization

        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return json.dumps(
            {"endpoint": self.endpoint, "keys": {"p256dh": b64u(public), "auth": b64u(self.auth)}}
        )


class FakePushService(FakeServer):
    """POST /push/<id>: 201 with a Location; 410 for expired subscriptions; VAPID must verify."""

    def __init__(self, *, vapid_public: ec.EllipticCurvePublicKey | None = None) -> None:
        super().__init__(tls=True)  # push endpoints are https only
        self.vapid_public = vapid_public
        self.browsers: dict[str, Browser] = {}
        self.expired: set[str] = set()
        self.delivered: list[tuple[str, dict[str, Any]]] = []
        self.locations: list[str] = []  # the Location answered for delivered[i]

    def browser(self) -> Browser:
        """A new subscription on this service."""
        name = secrets.token_hex(6)
        browser = Browser(f"{self.url}/push/{name}")
        self.browsers[name] = browser
        return browser

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/push/{name}", self._route(self._push_message))

    def _vapid_ok(self, rec: Recorded) -> bool:
        header = rec.header("authorization") or ""
        scheme, _, rest = header.partition(" ")
        if scheme.lower() != "vapid":
            return False
        params = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        try:
            head, claims, signature = params["t"].split(".")
            raw = b64u_decode(signature)
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64u_decode(params["k"])
            )
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            public.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
            audience = json.loads(b64u_decode(claims))["aud"]
        except Exception:
            return False
        if (
            self.vapid_public is not None
            and public.public_numbers() != self.vapid_public.public_numbers()
        ):
            return False
        return bool(audience == self.url)

    async def _push_message(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        name = request.match_info["name"]
        if not rec.header("ttl"):
            return web.Response(status=400, text="TTL header required")
        if not self._vapid_ok(rec):
            return web.Response(status=403, text="VAPID signature or claims invalid")
        if name in self.expired or name not in self.browsers:
            return web.Response(status=410, text="subscription expired")
        if rec.header("content-encoding") != "aes128gcm":
            return web.Response(status=400, text="aes128gcm only")
        browser = self.browsers[name]
        try:
            plaintext = webpush.decrypt(rec.body, browser.key, browser.auth)
        except Exception:
            return web.Response(status=400, text="cannot decrypt")
        self.delivered.append((name, json.loads(plaintext)))
        self.locations.append(f"{self.url}/message/{secrets.token_hex(8)}")
        return web.Response(status=201, headers={"Location": self.locations[-1]})
