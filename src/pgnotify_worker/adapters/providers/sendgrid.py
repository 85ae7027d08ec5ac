"""Email through SendGrid v3 mail/send: 202 accepted, the message id in X-Message-Id."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, Field, SecretStr

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.email_common import (
    missing_content,
    parse_sender,
    unsubscribe_headers,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSpec, reveal
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
            answer = await http.request(
                self.session, "POST", self.url, data=data, headers=self._headers
            )
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
        "sendgrid", frozenset({"email"}), SendGridSettings, _build, default_rate="100/100"
    ),
)
