"""SMS through Twilio's Messages API: form-encoded, HTTP Basic auth, E.164 numbers."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.core.addresses import to_e164
from pgnotify_worker.core.classify import classify_twilio
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Sent


class TwilioProvider(http.HttpProvider):
    """https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource

    Twilio has no idempotency key for sends: a retry after a timeout may deliver twice."""

    name = "twilio"

    def __init__(
        self,
        account_sid: str | None,
        auth_token: str | None,
        *,
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        region: str = "US",
        status_callback: str | None = None,
        base_url: str = "https://api.twilio.com",
        timeout: float = 15.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not account_sid or not auth_token:
            raise ProviderConfigError(
                "twilio: PGNOTIFY_TWILIO_ACCOUNT_SID and PGNOTIFY_TWILIO_AUTH_TOKEN must be set"
            )
        if not sender and not messaging_service_sid:
            raise ProviderConfigError(
                "twilio: set PGNOTIFY_TWILIO_FROM or PGNOTIFY_TWILIO_MESSAGING_SERVICE_SID"
            )
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        self._headers = {"Authorization": f"Basic {credentials}"}
        self.origin = (
            {"MessagingServiceSid": messaging_service_sid}
            if messaging_service_sid
            else {"From": sender or ""}
        )
        self.region = region.upper()
        self.status_callback = status_callback
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        super().__init__(timeout, now)

    def form(self, message: RenderedMessage, number: str) -> dict[str, str]:
        """The form fields of one message."""
        form = {"To": number, "Body": message.text or "", **self.origin}
        if self.status_callback:
            form["StatusCallback"] = self.status_callback
        return form

    async def send(self, message: RenderedMessage) -> Outcome:
        number = to_e164(message.recipient, self.region)
        if number is None:
            return Permanent(
                "invalid_number",
                f"recipient is not a valid phone number (default region {self.region})",
            )
        if not message.text:
            return Permanent("no_content", "an SMS needs a body")
        try:
            answer = await http.request(
                self.session,
                "POST",
                self.url,
                data=self.form(message, number),
                headers=self._headers,
            )
        except http.TRANSPORT_ERRORS as exc:
            return http.transport_outcome(exc, "twilio")
        found = http.json_body(answer)
        if answer.status in (200, 201) and isinstance(found.get("sid"), str):
            return Sent(found["sid"])
        code = found.get("code")
        return classify_twilio(
            answer.status,
            code if isinstance(code, int) else None,
            str(found.get("message", ""))[:300],
            answer.headers,
            self.now(),
        )
