"""Email through Resend: POST /emails, Bearer key, Idempotency-Key from the notification."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
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
    format_sender,
    missing_content,
    parse_sender,
    unsubscribe_headers,
    whole_or_each,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.core import signing
from pgnotify_worker.core.classify import RETRYABLE_STATUS, classify_http, retry_after_from
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider


class ResendProvider(http.HttpProvider):
    """https://resend.com/docs/api-reference/emails/send-email"""

    name = "resend"

    def __init__(
        self,
        api_key: str | None,
        sender: str | None,
        *,
        base_url: str = "https://api.resend.com",
        timeout: float = 15.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not api_key:
            raise ProviderConfigError("resend: PGNOTIFY_RESEND_API_KEY is not set")
        self.sender = format_sender(*parse_sender(sender, "resend"))
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.url = base_url.rstrip("/") + "/emails"
        self.batch_url = self.url + "/batch"
        super().__init__(timeout, now)

    batch_limit = 100  # POST /emails/batch takes up to 100 emails

    def batch_key(self, message: RenderedMessage) -> str:
        """Every email of a batch is complete in itself: any two may share a request."""
        return "emails"

    async def send_batch(self, messages: Sequence[RenderedMessage]) -> Sequence[Outcome] | Outcome:
        """POST /emails/batch in permissive validation mode: a rejected email is reported by its
        index in `errors` and the others are sent. The request's Idempotency-Key is derived from
        its emails' keys, so the same batch retried after a 5xx or a timeout is answered from
        Resend's record instead of being sent again (https://resend.com/docs/api-reference/
        emails/send-batch-emails)."""
        if len(messages) == 1:  # alone (a retry, mostly): POST /emails with its own key
            return [await self.send(messages[0])]
        outcomes: list[Outcome | None] = [missing_content(m) for m in messages]
        members = [i for i, o in enumerate(outcomes) if o is None]
        if members:
            batch = [messages[i] for i in members]
            headers = {
                **self._headers,
                "Idempotency-Key": batch_idempotency_key(batch),
                "x-batch-validation": "permissive",
            }
            data = json.dumps([self.body(m) for m in batch]).encode()
            try:
                answer = await self.call("POST", self.batch_url, data=data, headers=headers)
            except http.TRANSPORT_ERRORS as exc:  # retried with the same key: safe
                return whole_or_each(outcomes, http.transport_outcome(exc, "resend"))
            found = http.json_body(answer)
            if answer.status != 200 or not isinstance(found.get("data"), list):
                return whole_or_each(
                    outcomes,
                    classify_resend(
                        answer.status,
                        found.get("name") if isinstance(found.get("name"), str) else None,
                        str(found.get("message", ""))[:300],
                        answer.headers,
                        self.now(),
                    ),
                )
            for i, outcome in zip(members, resend_batch_items(found, len(batch)), strict=True):
                outcomes[i] = outcome
        return [o if o is not None else Retryable("resend_batch", "not sent") for o in outcomes]

    def body(self, message: RenderedMessage) -> dict[str, Any]:
        """The JSON of POST /emails."""
        body: dict[str, Any] = {
            "from": self.sender,
            "to": [message.recipient],
            "subject": message.subject,
            "tags": [{"name": "notification_id", "value": str(message.notification_id)}],
        }
        if message.text:
            body["text"] = message.text
        if message.html:
            body["html"] = message.html
        headers = unsubscribe_headers(message)
        if headers:
            body["headers"] = headers
        return body

    async def send(self, message: RenderedMessage) -> Outcome:
        problem = missing_content(message)
        if problem:
            return problem
        headers = {**self._headers, "Idempotency-Key": message.idempotency_key}
        data = json.dumps(self.body(message)).encode()
        try:
            answer = await self.call("POST", self.url, data=data, headers=headers)
        except http.TRANSPORT_ERRORS as exc:
            return http.transport_outcome(exc, "resend")  # retried with the same key: safe
        found = http.json_body(answer)
        if answer.status == 200 and isinstance(found.get("id"), str):
            return Sent(found["id"])
        return classify_resend(
            answer.status,
            found.get("name") if isinstance(found.get("name"), str) else None,
            str(found.get("message", ""))[:300],
            answer.headers,
            self.now(),
        )


def batch_idempotency_key(messages: Sequence[RenderedMessage]) -> str:
    """The same emails in the same order give the same key (at most 256 characters)."""
    digest = hashlib.sha256("\n".join(m.idempotency_key for m in messages).encode()).hexdigest()
    return f"pgnotify-batch/{digest}"


def resend_batch_items(found: Mapping[str, Any], size: int) -> list[Outcome]:
    """Per email of a permissive batch answer: `errors` name rejected emails by index (0-based,
    in the request); `data` holds the ids of the created ones, in request order."""
    rejected: dict[int, str] = {}
    for error in found.get("errors") or []:
        if isinstance(error, dict) and isinstance(error.get("index"), int):
            rejected[error["index"]] = str(error.get("message", ""))[:300]
    ids = [item.get("id") if isinstance(item, dict) else None for item in found["data"]]
    if len(ids) + len(rejected) != size or not all(isinstance(i, str) for i in ids):
        # An answer that does not add up: which email got which id is unknown. Retried as the
        # same batch (same key), Resend answers from its record rather than sending again.
        unclear = Retryable("resend_batch_answer", "resend batch answer does not match the request")
        return [unclear] * size
    created = iter(ids)
    return [
        Permanent("resend_validation_error", f"resend rejected this email: {rejected[index]}")
        if index in rejected
        else Sent(str(next(created)))
        for index in range(size)
    ]


# --- how its answers are classified ---------------------------------------------------------

RESEND_TRIP = frozenset(
    {
        "missing_api_key",
        "restricted_api_key",
        "invalid_api_key",
        "daily_quota_exceeded",
        "monthly_quota_exceeded",
    }
)


def classify_resend(
    status: int, name: str | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """Resend's error `name`s (https://resend.com/docs/api-reference/errors)."""
    what = f"resend {name or status}"
    if name in RESEND_TRIP or (status == 403 and name == "validation_error"):
        # credentials, an unverified domain, a spent quota: every send would fail the same way
        quota = name in ("daily_quota_exceeded", "monthly_quota_exceeded")
        wait = retry_after_from(headers, now) if quota else None
        return Retryable(f"resend_{name}", f"{what}: {message}", wait, trip=True)
    if name == "rate_limit_exceeded":
        return Retryable(
            "resend_rate_limited", f"{what}", retry_after_from(headers, now), throttled=True
        )
    if name == "concurrent_idempotent_requests":
        return Retryable("resend_concurrent", f"{what}: the first attempt is still in flight", 1.0)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="resend")
    return Permanent(f"resend_{name or status}", f"{what}: {message}")


# --- its delivery reports (POST /webhooks/resend) -------------------------------------------

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


def _inbound(cfg: ResendSettings) -> Endpoint | None:
    """The report endpoint, when its signing key is configured."""
    secret = reveal(cfg.resend_webhook_secret)
    if not secret:
        return None

    async def handle(request: web.Request, inbound: Inbound) -> web.Response:
        body = await request.read()  # over MAX_BODY: 413
        headers = request.headers
        msg_id = headers.get("svix-id") or headers.get("webhook-id") or ""
        stamp = headers.get("svix-timestamp") or headers.get("webhook-timestamp")
        signature = headers.get("svix-signature") or headers.get("webhook-signature") or ""
        if stamp and signing.parse_timestamp(stamp) is None:
            return inbound.reject("resend", "svix-timestamp is not a Unix time")
        if not (msg_id.isascii() and signature.isascii()):
            return inbound.reject("resend", "svix-id and svix-signature must be ASCII")
        if not signing.verify_svix(secret, dict(headers), body, inbound.clock()):
            return inbound.refuse("resend", "invalid or missing svix signature")
        try:
            payload = parse_json(body)
        except BadRequest as exc:
            return inbound.reject("resend", str(exc))
        report = resend_report(payload, msg_id) if isinstance(payload, dict) else None
        return await inbound.record("resend", [report] if report else [])

    return Endpoint("/webhooks/resend", handle)


# --- settings and construction (read by the registry and the settings table) -------------------


class ResendSettings(ProviderSettings):
    """resend settings (PGNOTIFY_RESEND_*)."""

    resend_api_key: SecretStr | None = Field(None, description="Resend API key (re_...).")
    resend_base_url: str = Field("https://api.resend.com", description="Resend API base URL.")
    resend_webhook_secret: SecretStr | None = Field(
        None, description="Resend webhook signing secret (whsec_...) for POST /webhooks/resend."
    )


def _build(cfg: ResendSettings, ctx: Context) -> Provider:
    return ResendProvider(
        reveal(cfg.resend_api_key),
        ctx.settings.email_from,
        base_url=cfg.resend_base_url,
        timeout=ctx.settings.provider_timeout,
    )


# Resend's own pages say 2, 5 and 10 per second per team; its current page says 5.
SPECS = (
    ProviderSpec(
        "resend",
        frozenset({"email"}),
        ResendSettings,
        _build,
        default_rate="5/5",
        inbound=_inbound,
    ),
)
