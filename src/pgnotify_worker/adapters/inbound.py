"""Delivery reports from providers (POST /webhooks/<provider>): what every endpoint shares.
Each provider module declares its endpoint (signature check and mapping to our events).

Each request's signature is checked first (401 and nothing changes when it is bad or missing).
A request that cannot be read (a malformed timestamp or signature header, a body that is not
JSON or not UTF-8, JSON nested deeper than MAX_JSON_DEPTH) gets 400, a Twilio callback that is not
a urlencoded form 415, a body over http_server.MAX_BODY 413; none of them changes anything.
A report becomes an event of the notification it is about; a hard bounce, a spam complaint or
an SMS STOP also puts the address on pgnotify.suppressions."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pgnotify_worker.adapters.db import DB_ERRORS, QueueStore
from pgnotify_worker.core.addresses import normalize
from pgnotify_worker.core.redact import mask_recipient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Report:
    """One provider report, mapped to our vocabulary."""

    event: str  # delivered, bounced, complained, delivery_failed, ...
    external_id: str  # the provider's id of this report (dedup)
    notification_id: int | None = None
    provider_message_id: str | None = None
    suppress: str | None = None  # reason, when the address must not be used again
    error_code: str | None = None
    error: str | None = None
    detail: dict[str, Any] | None = None


# --- reading request bodies: pure ----------------------------------------------------------------

MAX_JSON_DEPTH = 32  # provider reports nest 3-5 levels; deeper is an attack, not a report


class BadRequest(ValueError):
    """A body or header we cannot read: 400 with this message, nothing recorded."""


def _no_constants(name: str) -> Any:
    raise BadRequest(f"not JSON: {name} is not a JSON number")


def clean_text(text: str) -> str:
    """Text PostgreSQL can store: NUL and lone surrogates (JSON \\u escapes allow both) are
    replaced instead of failing the write (and the provider's retries) for ever."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


def _clean(value: Any) -> Any:
    """`value` with clean_text applied to every string; BadRequest for a non-finite number."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {clean_text(key): _clean(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest("a number in the JSON is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """The JSON document of a report body, safe to walk and to store, or BadRequest: not JSON,
    nested deeper than MAX_JSON_DEPTH (a RecursionError in the parser is caught too)."""
    try:
        document = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except BadRequest:
        raise
    except ValueError:
        raise BadRequest("not JSON") from None
    stack = [(document, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return _clean(document)  # recursion bounded by MAX_JSON_DEPTH


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A provider's report endpoint (declared by its module's SPECS `inbound`): POST `path`,
    answered by `handle(request, inbound)`."""

    path: str
    handle: Callable[[web.Request, Inbound], Awaitable[web.Response]]


class Inbound:
    """The report endpoints of the configured providers; `store` is a callable because the pool
    comes up after the server. A provider without its signing key has no endpoint (404)."""

    def __init__(
        self,
        store: Callable[[], QueueStore | None],
        endpoints: Sequence[Endpoint],
        *,
        public_base_url: str | None = None,
        sms_region: str = "US",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.endpoints = list(endpoints)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.clock = clock
        self.sms_region = sms_region

    def routes(self, app: web.Application) -> None:
        for endpoint in self.endpoints:
            app.router.add_post(endpoint.path, self._handler(endpoint))

    def _handler(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await endpoint.handle(request, self)

        return handle

    def url_of(self, request: web.Request) -> str:
        """The URL the provider signed: under public_base_url when set (behind a proxy)."""
        if self.public_base_url:
            return f"{self.public_base_url}{request.path_qs}"
        return str(request.url)

    @staticmethod
    def refuse(provider: str, why: str) -> web.Response:
        log.warning(
            "refused a %s webhook: %s",
            provider,
            why,
            extra={"action": "webhook_refused", "provider": provider},
        )
        return web.json_response({"error": why}, status=401)

    @staticmethod
    def reject(provider: str, why: str, status: int = 400) -> web.Response:
        log.warning(
            "rejected a %s webhook: %s",
            provider,
            why,
            extra={"action": "webhook_rejected", "provider": provider},
        )
        return web.json_response({"error": why}, status=status)

    async def record(self, provider: str, reports: list[Report]) -> web.Response:
        store = self.store()
        if store is None:
            return web.json_response({"error": "starting"}, status=503)  # the provider retries
        recorded = 0
        try:
            for report in reports:
                found = await store.provider_event(
                    provider,
                    event=report.event,
                    external_id=report.external_id,
                    notification_id=report.notification_id,
                    provider_message_id=report.provider_message_id,
                    error_code=report.error_code,
                    error=report.error,
                    detail=report.detail,
                )
                if found is None:
                    continue  # not one of ours (or already retained away)
                notification_id, channel, recipient, stored = found
                recorded += stored
                if report.suppress and stored:
                    address = normalize(channel, recipient, self.sms_region)
                    detail = {"notification_id": notification_id, "event": report.event}
                    await store.suppress(channel, address, report.suppress, provider, detail)
                    log.info(
                        "%s is suppressed (%s, reported by %s)",
                        mask_recipient(channel, recipient),
                        report.suppress,
                        provider,
                        extra={"action": "suppressed", "notification_id": notification_id},
                    )
        except DB_ERRORS:
            return web.json_response({"error": "database unavailable"}, status=503)
        return web.json_response({"recorded": recorded})
