"""Email through SendGrid v3 mail/send: 202 accepted, the message id in X-Message-Id."""

from __future__ import annotations

import datetime as dt
import html as htmllib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from pydantic import Field, SecretStr

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
    whole_or_each,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
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

    # --- many recipients in one request: personalizations ------------------------------------

    batch_limit = 1000  # personalizations (and recipients) per mail/send request

    def _shared(self, message: RenderedMessage) -> tuple[str | None, str | None, dict[str, str]]:
        """Text and HTML with this recipient's own values (address, unsubscribe link) replaced
        by substitution tags, and the values: what personalizations carry per recipient."""
        values = {RECIPIENT_TAG: message.recipient}
        if message.unsubscribe_url:
            values[UNSUBSCRIBE_TAG] = message.unsubscribe_url
            values[UNSUBSCRIBE_HTML_TAG] = htmllib.escape(message.unsubscribe_url)

        def generic(text: str | None, tags: tuple[str, ...]) -> str | None:
            for tag in tags:  # longest value first: a link may contain the address
                if text is not None and values.get(tag):
                    text = text.replace(values[tag], tag)
            return text

        order = sorted(values, key=lambda tag: -len(values[tag]))
        text = generic(message.text, tuple(t for t in order if t != UNSUBSCRIBE_HTML_TAG))
        html = generic(message.html, tuple(t for t in order if t != UNSUBSCRIBE_TAG))
        return text, html, values

    def batch_key(self, message: RenderedMessage) -> tuple[str | None, ...]:
        """Recipients share a request when their email is the same apart from their own address
        and unsubscribe link (a broadcast): SendGrid sends one content to every personalization,
        with each one's substitutions. Content that already holds a tag goes alone."""
        raw = f"{message.text or ''}{message.html or ''}"
        if TAG_RE.search(raw):
            return ("alone", str(message.notification_id))
        text, html, _ = self._shared(message)
        return (text, html, self._category(message))

    @staticmethod
    def _category(message: RenderedMessage) -> str | None:
        category = message.category
        return category if category and category.isascii() and len(category) <= 255 else None

    def batch_body(self, messages: Sequence[RenderedMessage]) -> dict[str, Any]:
        """One mail/send body: the shared content once, a personalization per message (its
        recipient, subject, substitutions, custom_args and unsubscribe headers)."""
        text, html, _ = self._shared(messages[0])
        personalizations = []
        for message in messages:
            values = self._shared(message)[2]
            personalization: dict[str, Any] = {
                "to": [{"email": message.recipient}],
                "subject": message.subject,
                "substitutions": values,
                "custom_args": {
                    "notification_id": str(message.notification_id),
                    "idempotency_key": message.idempotency_key,
                },
            }
            headers = unsubscribe_headers(message)
            if headers:
                personalization["headers"] = headers
            personalizations.append(personalization)
        content = []
        if text:
            content.append({"type": "text/plain", "value": text})
        if html:
            content.append({"type": "text/html", "value": html})
        body: dict[str, Any] = {
            "personalizations": personalizations,
            "from": self.sender,
            "subject": messages[0].subject,
            "content": content,
        }
        category = self._category(messages[0])
        if category:
            body["categories"] = [category]
        return body

    async def send_batch(self, messages: Sequence[RenderedMessage]) -> Sequence[Outcome] | Outcome:
        """One request for the group. SendGrid takes or refuses a request whole (one 202, one
        X-Message-Id for all); a 400 whose errors all name personalizations fails those
        messages with their own error and sends the others once more. SendGrid has no
        idempotency key: a request retried after a 5xx or a timeout may deliver twice (as a
        single send may); custom_args carry each notification id, so reports map back."""
        if len(messages) == 1:
            return [await self.send(messages[0])]
        outcomes: list[Outcome | None] = [missing_content(m) for m in messages]
        for _ in range(2):
            members = [i for i, o in enumerate(outcomes) if o is None]
            if not members:
                break
            data = json.dumps(self.batch_body([messages[i] for i in members])).encode()
            try:
                answer = await self.call("POST", self.url, data=data, headers=self._headers)
            except http.TRANSPORT_ERRORS as exc:
                return whole_or_each(outcomes, http.transport_outcome(exc, "sendgrid"))
            errors = http.json_body(answer).get("errors")
            items = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
            if answer.status == 400 and items:
                named = [personalization_index(e.get("field")) for e in items]
                if all(i is not None and i < len(members) for i in named):
                    for index, error in zip(named, items, strict=True):
                        assert index is not None
                        message = str(error.get("message", ""))[:300]
                        outcomes[members[index]] = Permanent(
                            "sendgrid_400", f"sendgrid refused this recipient: {message}"
                        )
                    continue  # the rest were not sent: once more without the refused ones
            first = items[0] if items else {}
            outcome = classify_sendgrid(
                answer.status,
                str(first.get("message", ""))[:300],
                answer.headers,
                self.now(),
                answer.headers.get("X-Message-Id"),
            )
            if isinstance(outcome, Sent):
                return [outcome if o is None else o for o in outcomes]
            return whole_or_each(outcomes, outcome)
        return [
            o if o is not None else Retryable("sendgrid_batch", "refused twice; sent alone next")
            for o in outcomes
        ]


RECIPIENT_TAG = "-pgnotify-recipient-"
UNSUBSCRIBE_TAG = "-pgnotify-unsubscribe-url-"
UNSUBSCRIBE_HTML_TAG = "-pgnotify-unsubscribe-url-html-"
TAG_RE = re.compile(r"-pgnotify-[a-z-]+-")
_PERSONALIZATION_FIELD = re.compile(r"^personalizations\.(\d+)\.")


def personalization_index(field: object) -> int | None:
    """3 for an error field `personalizations.3.to.0.email`; None for any other field."""
    found = _PERSONALIZATION_FIELD.match(field) if isinstance(field, str) else None
    return int(found.group(1)) if found else None


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


class SendGridSettings(ProviderSettings):
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
