"""Email through Resend: POST /emails, Bearer key, Idempotency-Key from the notification."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.email_common import (
    format_sender,
    missing_content,
    parse_sender,
    unsubscribe_headers,
)
from pgnotify_worker.core.classify import classify_resend
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, RenderedMessage, Sent


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
        super().__init__(timeout, now)

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
            answer = await http.request(self.session, "POST", self.url, data=data, headers=headers)
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
