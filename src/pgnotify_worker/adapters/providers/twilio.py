"""SMS through Twilio's Messages API: form-encoded, HTTP Basic auth, E.164 numbers."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping

from aiohttp import web
from pydantic import Field, SecretStr

from pgnotify_worker.adapters.inbound import (
    Endpoint,
    Inbound,
    Report,
    clean_text,
)
from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.core import signing
from pgnotify_worker.core.addresses import to_e164
from pgnotify_worker.core.classify import RETRYABLE_STATUS, classify_http, retry_after_from
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider


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
            answer = await self.call(
                "POST", self.url, data=self.form(message, number), headers=self._headers
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


# --- how its answers are classified ---------------------------------------------------------

TWILIO_BAD_NUMBER = frozenset({21211, 21612, 21614, 21635, 30005, 30006})
TWILIO_CONFIG = frozenset({20003, 21606, 21608, 21408, 20404})


def classify_twilio(
    status: int, code: int | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """Twilio error codes (https://www.twilio.com/docs/api/errors)."""
    what = f"twilio {code or status}"
    if code == 21610:
        return Permanent(
            "twilio_21610", f"{what}: the recipient replied STOP", suppress="unsubscribed"
        )
    if code in TWILIO_BAD_NUMBER:
        return Permanent(f"twilio_{code}", f"{what}: {message}", suppress="invalid_number")
    if code in TWILIO_CONFIG or status == 401:
        return Retryable(f"twilio_{code or status}", f"{what}: {message}", None, trip=True)
    if code == 20429 or status == 429:
        return Retryable("twilio_20429", what, retry_after_from(headers, now), throttled=True)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="twilio")
    return Permanent(f"twilio_{code or status}", f"{what}: {message}")


# --- its delivery reports (POST /webhooks/twilio) -------------------------------------------

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


def _inbound(cfg: TwilioSettings) -> Endpoint | None:
    """The report endpoint, when its signing key is configured."""
    secret = reveal(cfg.twilio_auth_token)
    if not secret:
        return None

    async def handle(request: web.Request, inbound: Inbound) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            # Twilio posts urlencoded forms only; a multipart parser is attack surface we skip
            return inbound.reject("twilio", "expected application/x-www-form-urlencoded", 415)
        try:
            form = await request.post()  # over MAX_BODY: 413
        except ValueError:  # bytes that are not UTF-8
            return inbound.reject("twilio", "the form is not UTF-8")
        params: dict[str, list[str]] = {}
        for name, value in form.items():
            params.setdefault(name, []).append(str(value))
        url = inbound.url_of(request)
        header = request.headers.get("X-Twilio-Signature", "")
        if not header.isascii():
            return inbound.reject("twilio", "X-Twilio-Signature must be ASCII")
        if not header or not signing.verify_twilio(secret, url, params, header):
            return inbound.refuse("twilio", "invalid or missing X-Twilio-Signature")
        report = twilio_report({name: clean_text(values[0]) for name, values in params.items()})
        return await inbound.record("twilio", [report] if report else [])

    return Endpoint("/webhooks/twilio", handle)


# --- settings and construction (read by the registry and the settings table) -------------------


class TwilioSettings(ProviderSettings):
    """twilio settings (PGNOTIFY_TWILIO_*)."""

    twilio_account_sid: str | None = Field(None, description="Twilio Account SID (AC...).")
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio Auth Token (also checks status-callback signatures)."
    )
    twilio_from: str | None = Field(None, description="Sender number (E.164) or alphanumeric id.")
    twilio_messaging_service_sid: str | None = Field(
        None, description="Messaging Service SID (MG...); used instead of twilio_from when set."
    )
    twilio_base_url: str = Field("https://api.twilio.com", description="Twilio API base URL.")

    def basic_auth_pairs(self) -> list[tuple[str, str]]:
        """The Basic credentials of its requests (scrubbed in every encoding)."""
        token = reveal(self.twilio_auth_token)
        return [(self.twilio_account_sid, token)] if self.twilio_account_sid and token else []


def _build(cfg: TwilioSettings, ctx: Context) -> Provider:
    base = ctx.settings.public_base_url
    return TwilioProvider(
        cfg.twilio_account_sid,
        reveal(cfg.twilio_auth_token),
        sender=cfg.twilio_from,
        messaging_service_sid=cfg.twilio_messaging_service_sid,
        region=ctx.settings.sms_default_region,
        status_callback=f"{base.rstrip('/')}/webhooks/twilio" if base else None,
        base_url=cfg.twilio_base_url,
        timeout=ctx.settings.provider_timeout,
    )


# Twilio queues what it cannot send at once.
SPECS = (
    ProviderSpec(
        "twilio",
        frozenset({"sms"}),
        TwilioSettings,
        _build,
        default_rate="50/50",
        inbound=_inbound,
    ),
)
