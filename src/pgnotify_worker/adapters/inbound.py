"""Delivery reports from providers: POST /webhooks/resend, /webhooks/sendgrid, /webhooks/twilio.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pgnotify_worker.adapters.db import DB_ERRORS, QueueStore
from pgnotify_worker.core import signing
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


# --- mapping: pure -----------------------------------------------------------------------------

RESEND_EVENTS = {
    "email.delivered": "delivered",
    "email.delivery_delayed": "delivery_delayed",
    "email.bounced": "bounced",
    "email.complained": "complained",
    "email.failed": "delivery_failed",
    "email.suppressed": "provider_suppressed",
    "email.opened": "opened",
    "email.clicked": "clicked",
}


def resend_report(payload: dict[str, Any], svix_id: str) -> Report | None:
    """A Resend event, or None for one we do not track (email.sent, account events)."""
    event = RESEND_EVENTS.get(str(payload.get("type")))
    data = payload.get("data")
    if event is None or not isinstance(data, dict) or not isinstance(data.get("email_id"), str):
        return None
    suppress = None
    detail: dict[str, Any] = {"type": payload.get("type")}
    if event == "bounced" and isinstance(data.get("bounce"), dict):
        bounce = data["bounce"]
        detail["bounce"] = {k: bounce.get(k) for k in ("type", "subType", "message")}
        if bounce.get("type") == "Permanent":
            suppress = "hard_bounce"
    elif event == "complained":
        suppress = "complaint"
    elif event == "provider_suppressed":
        suppress = "provider_suppressed"
    return Report(
        event,
        svix_id,
        provider_message_id=data["email_id"],
        suppress=suppress,
        error_code=f"resend_{event}" if suppress or event == "delivery_failed" else None,
        detail=detail,
    )


SENDGRID_EVENTS = {
    "delivered": "delivered",
    "deferred": "delivery_delayed",
    "dropped": "dropped",
    "bounce": "bounced",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
    "open": "opened",
    "click": "clicked",
}


def _is_bigint(text: str) -> bool:
    """ASCII digits that fit a bigint ('٣' is a digit to str.isdigit; 10**30 is not an id)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def sendgrid_report(item: dict[str, Any]) -> Report | None:
    """One SendGrid event, found by our custom_args notification_id or by sg_message_id."""
    kind = str(item.get("event"))
    event = SENDGRID_EVENTS.get(kind)
    event_id = item.get("sg_event_id")
    if event is None or not isinstance(event_id, str):
        return None
    suppress = None
    if kind == "bounce":
        if item.get("type") == "blocked":
            event = "blocked"  # temporary: the receiving server refused this time
        else:
            suppress = "hard_bounce"
    elif kind == "spamreport":
        suppress = "complaint"
    elif kind in ("unsubscribe", "group_unsubscribe"):
        suppress = "unsubscribed"
    notification_id = str(item.get("notification_id", ""))
    message_id = item.get("sg_message_id")
    return Report(
        event,
        event_id,
        notification_id=int(notification_id) if _is_bigint(notification_id) else None,
        provider_message_id=str(message_id).split(".", 1)[0] if message_id else None,
        suppress=suppress,
        error_code=f"sendgrid_{kind}" if suppress or kind in ("dropped", "bounce") else None,
        error=str(item.get("reason", ""))[:300] or None,
        detail={k: item.get(k) for k in ("event", "type", "status") if item.get(k) is not None},
    )


TWILIO_FINAL = {
    "delivered": "delivered",
    "undelivered": "delivery_failed",
    "failed": "delivery_failed",
}
TWILIO_DEAD_NUMBER = {"30005": "invalid_number", "30006": "invalid_number", "21610": "unsubscribed"}


def twilio_report(form: dict[str, str]) -> Report | None:
    """A Twilio status callback; only final states are recorded."""
    status = form.get("MessageStatus", "")
    event = TWILIO_FINAL.get(status)
    sid = form.get("MessageSid")
    if event is None or not sid:
        return None
    code = form.get("ErrorCode") or None
    return Report(
        event,
        f"{sid}:{status}",
        provider_message_id=sid,
        suppress=TWILIO_DEAD_NUMBER.get(code or ""),
        error_code=f"twilio_{code}" if code else None,
        detail={"status": status},
    )


# --- HTTP ---------------------------------------------------------------------------------------


class Inbound:
    """The three endpoints; `store` is a callable because the pool comes up after the server."""

    def __init__(
        self,
        store: Callable[[], QueueStore | None],
        *,
        resend_secret: str | None,
        sendgrid_public_key: str | None,
        twilio_auth_token: str | None,
        public_base_url: str | None,
        sms_region: str = "US",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.resend_secret = resend_secret
        self.sendgrid_public_key = sendgrid_public_key
        self.twilio_auth_token = twilio_auth_token
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.clock = clock
        self.sms_region = sms_region

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/webhooks/resend", self.resend)
        app.router.add_post("/webhooks/sendgrid", self.sendgrid)
        app.router.add_post("/webhooks/twilio", self.twilio)

    @staticmethod
    def _refuse(provider: str, why: str) -> web.Response:
        log.warning(
            "refused a %s webhook: %s",
            provider,
            why,
            extra={"action": "webhook_refused", "provider": provider},
        )
        return web.json_response({"error": why}, status=401)

    @staticmethod
    def _reject(provider: str, why: str, status: int = 400) -> web.Response:
        log.warning(
            "rejected a %s webhook: %s",
            provider,
            why,
            extra={"action": "webhook_rejected", "provider": provider},
        )
        return web.json_response({"error": why}, status=status)

    async def _record(self, provider: str, reports: list[Report]) -> web.Response:
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

    async def resend(self, request: web.Request) -> web.Response:
        if not self.resend_secret:
            raise web.HTTPNotFound()
        body = await request.read()  # over MAX_BODY: 413
        headers = request.headers
        msg_id = headers.get("svix-id") or headers.get("webhook-id") or ""
        stamp = headers.get("svix-timestamp") or headers.get("webhook-timestamp")
        signature = headers.get("svix-signature") or headers.get("webhook-signature") or ""
        if stamp and signing.parse_timestamp(stamp) is None:
            return self._reject("resend", "svix-timestamp is not a Unix time")
        if not (msg_id.isascii() and signature.isascii()):
            return self._reject("resend", "svix-id and svix-signature must be ASCII")
        if not signing.verify_svix(self.resend_secret, dict(headers), body, self.clock()):
            return self._refuse("resend", "invalid or missing svix signature")
        try:
            payload = parse_json(body)
        except BadRequest as exc:
            return self._reject("resend", str(exc))
        report = resend_report(payload, msg_id) if isinstance(payload, dict) else None
        return await self._record("resend", [report] if report else [])

    async def sendgrid(self, request: web.Request) -> web.Response:
        if not self.sendgrid_public_key:
            raise web.HTTPNotFound()
        body = await request.read()  # over MAX_BODY: 413
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        stamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        if stamp and signing.parse_timestamp(stamp) is None:
            return self._reject("sendgrid", "the event webhook timestamp is not a Unix time")
        if not signature.isascii():
            return self._reject("sendgrid", "the event webhook signature must be ASCII")
        if not signing.verify_sendgrid(self.sendgrid_public_key, signature, stamp, body):
            return self._refuse("sendgrid", "invalid or missing event webhook signature")
        try:
            items = parse_json(body)
        except BadRequest as exc:
            return self._reject("sendgrid", str(exc))
        reports = [
            report
            for item in (items if isinstance(items, list) else [])
            if isinstance(item, dict) and (report := sendgrid_report(item)) is not None
        ]
        return await self._record("sendgrid", reports)

    async def twilio(self, request: web.Request) -> web.Response:
        if not self.twilio_auth_token:
            raise web.HTTPNotFound()
        if request.content_type != "application/x-www-form-urlencoded":
            # Twilio posts urlencoded forms only; a multipart parser is attack surface we skip
            return self._reject("twilio", "expected application/x-www-form-urlencoded", 415)
        try:
            form = await request.post()  # over MAX_BODY: 413
        except ValueError:  # bytes that are not UTF-8
            return self._reject("twilio", "the form is not UTF-8")
        params: dict[str, list[str]] = {}
        for name, value in form.items():
            params.setdefault(name, []).append(str(value))
        url = (
            f"{self.public_base_url}{request.path_qs}" if self.public_base_url else str(request.url)
        )
        header = request.headers.get("X-Twilio-Signature", "")
        if not header.isascii():
            return self._reject("twilio", "X-Twilio-Signature must be ASCII")
        if not header or not signing.verify_twilio(self.twilio_auth_token, url, params, header):
            return self._refuse("twilio", "invalid or missing X-Twilio-Signature")
        report = twilio_report({name: clean_text(values[0]) for name, values in params.items()})
        return await self._record("twilio", [report] if report else [])
