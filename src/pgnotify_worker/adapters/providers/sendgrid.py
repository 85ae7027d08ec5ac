"""Email through SendGrid v3 mail/send: 202 accepted, the message id in X-Message-Id."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, SecretStr

from pgnotify_worker.adapters.inbound import (
    BadRequest,
    Endpoint,
    Inbound,
    Report,
    parse_json,
)
from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.email_common import (
    missing_content,
    parse_sender,
    unsubscribe_headers,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSpec, reveal
from pgnotify_worker.core import signing
from pgnotify_worker.core.classify import RETRYABLE_STATUS, classify_http
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider


class SendGridProvider(http.HttpProvider):
    """https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send

    SendGrid has no idempotency key: a retry after a timeout may deliver twice. The
    notification id rides along in custom_args, so its Event Webhook reports map back to us."""

    name = "sendgrid"

    def __init__(
        self,
        api_key: str | None,
        sender: str | None,
        *,
        base_url: str = "https://api.sendgrid.com",
        timeout: float = 15.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not api_key:
            raise ProviderConfigError("sendgrid: PGNOTIFY_SENDGRID_API_KEY is not set")
        name, address = parse_sender(sender, "sendgrid")
        self.sender: dict[str, str] = {"email": address, **({"name": name} if name else {})}
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.url = base_url.rstrip("/") + "/v3/mail/send"
        super().__init__(timeout, now)

    def body(self, message: RenderedMessage) -> dict[str, Any]:
        """The JSON of POST /v3/mail/send; text/plain must come before text/html."""
        content = []
        if message.text:
            content.append({"type": "text/plain", "value": message.text})
        if message.html:
            content.append({"type": "text/html", "value": message.html})
        body: dict[str, Any] = {
            "personalizations": [
                {
                    "to": [{"email": message.recipient}],
                    "custom_args": {
                        "notification_id": str(message.notification_id),
                        "idempotency_key": message.idempotency_key,
                    },
                }
            ],
            "from": self.sender,
            "subject": message.subject,
            "content": content,
        }
        headers = unsubscribe_headers(message)
        if headers:
            body["headers"] = headers
        if message.category and message.category.isascii() and len(message.category) <= 255:
            body["categories"] = [message.category]
        return body

    async def send(self, message: RenderedMessage) -> Outcome:
        problem = missing_content(message)
        if problem:
            return problem
        data = json.dumps(self.body(message)).encode()
        try:
            answer = await self.call("POST", self.url, data=data, headers=self._headers)
        except http.TRANSPORT_ERRORS as exc:
            return http.transport_outcome(exc, "sendgrid")
        errors = http.json_body(answer).get("errors")
        first = (
            errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        )
        return classify_sendgrid(
            answer.status,
            str(first.get("message", ""))[:300],
            answer.headers,
            self.now(),
            answer.headers.get("X-Message-Id"),
        )


# --- how its answers are classified ---------------------------------------------------------


def classify_sendgrid(
    status: int, message: str, headers: Mapping[str, str], now: dt.datetime, message_id: str | None
) -> Outcome:
    """SendGrid v3 mail/send: 202 accepted; 401/403/451 pause; 429 reset header; 5xx retry."""
    if status in (200, 202):
        return Sent(message_id)
    if status in (401, 403, 451):
        return Retryable(
            f"sendgrid_{status}", f"sendgrid HTTP {status}: {message}", None, trip=True
        )
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="sendgrid")
    return Permanent(f"sendgrid_{status}", f"sendgrid HTTP {status}: {message}")


# --- its delivery reports (POST /webhooks/sendgrid) -------------------------------------------

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


def _inbound(cfg: SendGridSettings) -> Endpoint | None:
    """The report endpoint, when its signing key is configured."""
    secret = cfg.sendgrid_webhook_public_key
    if not secret:
        return None

    async def handle(request: web.Request, inbound: Inbound) -> web.Response:
        body = await request.read()  # over MAX_BODY: 413
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        stamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        if stamp and signing.parse_timestamp(stamp) is None:
            return inbound.reject("sendgrid", "the event webhook timestamp is not a Unix time")
        if not signature.isascii():
            return inbound.reject("sendgrid", "the event webhook signature must be ASCII")
        if not signing.verify_sendgrid(secret, signature, stamp, body):
            return inbound.refuse("sendgrid", "invalid or missing event webhook signature")
        try:
            items = parse_json(body)
        except BadRequest as exc:
            return inbound.reject("sendgrid", str(exc))
        reports = [
            report
            for item in (items if isinstance(items, list) else [])
            if isinstance(item, dict) and (report := sendgrid_report(item)) is not None
        ]
        return await inbound.record("sendgrid", reports)

    return Endpoint("/webhooks/sendgrid", handle)


# --- settings and construction (read by the registry and the settings table) -------------------


class SendGridSettings(BaseModel):
    """sendgrid settings (PGNOTIFY_SENDGRID_*)."""

    sendgrid_api_key: SecretStr | None = Field(None, description="SendGrid API key (SG....).")
    sendgrid_base_url: str = Field("https://api.sendgrid.com", description="SendGrid API base URL.")
    sendgrid_webhook_public_key: str | None = Field(
        None,
        description="SendGrid Signed Event Webhook public key (base64), for POST "
        "/webhooks/sendgrid.",
    )


def _build(cfg: SendGridSettings, ctx: Context) -> Provider:
    return SendGridProvider(
        reveal(cfg.sendgrid_api_key),
        ctx.settings.email_from,
        base_url=cfg.sendgrid_base_url,
        timeout=ctx.settings.provider_timeout,
    )


# SendGrid publishes no mail/send limit.
SPECS = (
    ProviderSpec(
        "sendgrid",
        frozenset({"email"}),
        SendGridSettings,
        _build,
        default_rate="100/100",
        inbound=_inbound,
    ),
)
