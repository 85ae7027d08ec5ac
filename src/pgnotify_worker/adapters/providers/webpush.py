"""Web Push (RFC 8030) to browser subscriptions: aes128gcm payloads, VAPID authentication."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import time
from collections.abc import Callable, Sequence

import aiohttp
from pydantic import Field, SecretStr
from yarl import URL

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.adapters.providers.webhook import (
    guarded_session,
    literal_refusal,
    origin,
)
from pgnotify_worker.core import netguard, webpush
from pgnotify_worker.core.classify import classify_http
from pgnotify_worker.errors import ProviderConfigError, TargetBlocked
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider


class WebPushProvider:
    """Sends to a device whose token is a PushSubscription JSON (platform 'web')."""

    name = "webpush"

    def __init__(
        self,
        vapid_private_key: str | None,
        subject: str | None,
        *,
        ttl: int = 86_400,
        timeout: float = 15.0,
        allowed_networks: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not vapid_private_key or not subject:
            raise ProviderConfigError(
                "webpush: PGNOTIFY_WEBPUSH_VAPID_PRIVATE_KEY and PGNOTIFY_WEBPUSH_SUBJECT must "
                "be set"
            )
        if not subject.startswith(("mailto:", "https://")):
            raise ProviderConfigError("webpush: PGNOTIFY_WEBPUSH_SUBJECT must be mailto: or https:")
        try:
            self.key = webpush.load_vapid_key(vapid_private_key)
        except ValueError as exc:
            raise ProviderConfigError(
                f"webpush: PGNOTIFY_WEBPUSH_VAPID_PRIVATE_KEY: {exc}"
            ) from None
        self.subject = subject
        self.ttl = ttl
        self.timeout = timeout
        self.allowed = netguard.parse_networks(allowed_networks)
        self.now = now
        self.ssl_context = ssl_context
        self.proxy = proxy or None
        self._session: aiohttp.ClientSession | None = None

    def handles(self, recipient: str) -> bool:
        """Only browser subscriptions (JSON), never FCM tokens."""
        return recipient.startswith("{")

    def destination(self, recipient: str) -> str | None:
        """The push service's origin (each browser vendor runs its own): isolated per origin."""
        try:
            endpoint = URL(webpush.Subscription.parse(recipient).endpoint)
        except (ValueError, KeyError, TypeError):
            return None  # send() fails it with the reason
        return origin(endpoint) if endpoint.host else None

    async def start(self) -> None:
        # push endpoints are customer-chosen URLs (the browser's push service): the same guard
        # (and the same optional PGNOTIFY_WEBHOOK_PROXY) as webhooks keeps sends off the LAN
        self._session = guarded_session(
            self.timeout, self.allowed, self.proxy, ssl_context=self.ssl_context
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def payload(self, message: RenderedMessage) -> bytes:
        """What the service worker receives: title, body and the data."""
        return json.dumps(
            {"title": message.subject, "body": message.text, "data": message.data},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    async def send(self, message: RenderedMessage) -> Outcome:
        assert self._session is not None, "start() first"
        try:
            subscription = webpush.Subscription.parse(message.recipient)
            body = webpush.encrypt(self.payload(message), subscription.p256dh, subscription.auth)
        except (ValueError, KeyError, TypeError) as exc:
            return Permanent("bad_subscription", f"webpush: {exc}", deactivate=True)
        endpoint = URL(subscription.endpoint)
        refusal = literal_refusal(endpoint, self.allowed, "push endpoint")
        if refusal is not None:
            return refusal
        headers = {
            "TTL": str(self.ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": "normal",
            "Authorization": webpush.vapid_authorization(
                self.key, subscription.endpoint, self.subject, int(time.time())
            ),
        }
        try:
            answer = await http.request(
                self._session, "POST", endpoint, data=body, headers=headers, proxy=self.proxy
            )
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, TargetBlocked):
                return Permanent("target_refused", f"push endpoint refused: {exc.os_error}")
            return http.transport_outcome(exc, "push service")
        except http.TRANSPORT_ERRORS as exc:
            return http.transport_outcome(exc, "push service")
        if answer.status in (404, 410):
            return Permanent(
                f"webpush_{answer.status}", "the browser subscription has expired", deactivate=True
            )
        if answer.status == 413:
            return Permanent("webpush_413", "push payload too large")
        if answer.status in (401, 403):
            return Retryable(
                f"webpush_{answer.status}", "push service refused our VAPID key", None, trip=True
            )
        outcome = classify_http(answer.status, answer.headers, self.now(), what="push service")
        if isinstance(outcome, Sent):
            return Sent(answer.headers.get("Location") or f"webpush-{message.notification_id}")
        return outcome


# --- settings and construction (read by the registry and the settings table) -------------------


class WebPushSettings(ProviderSettings):
    """webpush settings (PGNOTIFY_WEBPUSH_*)."""

    webpush_vapid_private_key: SecretStr | None = Field(
        None, description="VAPID private key for Web Push (PEM, or the raw key in base64url)."
    )
    webpush_subject: str | None = Field(
        None, description="VAPID contact: mailto:ops@example.com or an https URL."
    )
    webpush_ttl: int = Field(
        86_400, ge=0, description="Seconds a push service keeps a message for an offline browser."
    )


def _build(cfg: WebPushSettings, ctx: Context) -> Provider:
    return WebPushProvider(
        reveal(cfg.webpush_vapid_private_key),
        cfg.webpush_subject,
        ttl=cfg.webpush_ttl,
        timeout=ctx.settings.provider_timeout,
        allowed_networks=ctx.settings.webhook_allowed_networks,
        proxy=reveal(ctx.settings.webhook_proxy),
    )


SPECS = (
    ProviderSpec("webpush", frozenset({"push"}), WebPushSettings, _build, default_rate="100/100"),
)
