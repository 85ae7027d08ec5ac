"""A webhook consumer that verifies Standard Webhooks signatures, as a careful receiver does."""

from __future__ import annotations

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fakes.base import FakeServer, Recorded, make_response


class FakeWebhookReceiver(FakeServer):
    """`POST /hooks/{name}`: 204 when the signature verifies with `secret` (whsec_...), else 401.

    `received` holds the bodies of verified deliveries, in order; `requests` every request."""

    def __init__(self, secret: str, *, tls: bool = False) -> None:
        super().__init__(tls=tls)
        self.secret = secret
        self.received: list[bytes] = []

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/hooks/{name}", self._route(self._deliver))

    def verifies(self, rec: Recorded) -> bool:
        """The webhook-id/-timestamp/-signature headers sign this body with our secret."""
        try:
            Webhook(self.secret).verify(rec.body, rec.headers, json_parse=False)
        except WebhookVerificationError:
            return False
        return True

    async def _deliver(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if not self.verifies(rec):
            return make_response(401, {"error": "invalid signature"})
        self.received.append(rec.body)
        return web.Response(status=204)
