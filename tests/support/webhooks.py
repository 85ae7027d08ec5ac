"""A fake webhook receiver (an aiohttp app on 127.0.0.1) and the signing secret tests use."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-secret-0123456789abcdef!").decode()


@dataclass
class Received:
    """One request the receiver saw."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Received, int], Awaitable[web.StreamResponse] | web.StreamResponse]


@dataclass
class WebhookSink:
    """An aiohttp app on 127.0.0.1 that records requests and answers as the test says."""

    requests: list[Received] = field(default_factory=list)
    responder: Responder | None = None
    url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def for_id(self, webhook_id: str) -> list[Received]:
        return [r for r in self.requests if r.headers.get("webhook-id") == webhook_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            request.path_qs, dict(request.headers), await request.read(), time.monotonic()
        )
        self.requests.append(received)
        seen = len(self.for_id(received.headers.get("webhook-id", "")))
        async with self._changed:
            self._changed.notify_all()
        if self.responder is None:
            return web.json_response({"ok": True})
        answer = self.responder(received, seen)
        if asyncio.iscoroutine(answer):
            return await answer
        return answer  # type: ignore[return-value]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Until at least `count` requests arrived (bounded)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= count)
        return self.requests
