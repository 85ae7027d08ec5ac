"""Build each channel's providers from settings; a provider that cannot start disables its channel
with a reason (shown at start-up and in /status) instead of crashing mid-run."""

from __future__ import annotations

import logging

from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.adapters.providers.devsinks import ConsoleProvider, FileProvider
from pgnotify_worker.adapters.providers.fcm import FcmProvider
from pgnotify_worker.adapters.providers.inapp import InAppProvider
from pgnotify_worker.adapters.providers.resend import ResendProvider
from pgnotify_worker.adapters.providers.sendgrid import SendGridProvider
from pgnotify_worker.adapters.providers.smtp import SmtpProvider
from pgnotify_worker.adapters.providers.twilio import TwilioProvider
from pgnotify_worker.adapters.providers.webhook import WebhookProvider
from pgnotify_worker.adapters.providers.webpush import WebPushProvider
from pgnotify_worker.config import Settings, reveal
from pgnotify_worker.core.circuit import CircuitBreaker
from pgnotify_worker.core.ratelimit import TokenBucket, parse_rate
from pgnotify_worker.delivery.failover import ChannelProviders, ProviderSlot
from pgnotify_worker.errors import ConfigError, ProviderConfigError
from pgnotify_worker.ports import Provider

log = logging.getLogger(__name__)

# Which provider names make sense on which channel.
ALLOWED = {
    "email": {"resend", "sendgrid", "smtp", "console", "file"},
    "sms": {"twilio", "console", "file"},
    "push": {"fcm", "webpush", "console", "file"},
    "webhook": {"webhook", "console", "file"},
    "inapp": {"inapp", "console", "file"},
}

# Requests per second / burst when PGNOTIFY_RATE_LIMITS says nothing. Resend's own pages say
# 2, 5 and 10 per second per team; its current page says 5. SendGrid publishes no mail/send
# limit; FCM allows 600,000 per minute per project; Twilio queues what it cannot send at once.
DEFAULT_RATES = {
    "resend": "5/5",
    "sendgrid": "100/100",
    "smtp": "10/10",
    "twilio": "50/50",
    "fcm": "500/500",
    "webpush": "100/100",
}


def _build_one(name: str, channel: str, s: Settings, store: QueueStore) -> Provider:
    if name not in ALLOWED[channel]:
        raise ConfigError(
            f"PGNOTIFY_{channel.upper()}_PROVIDERS: {name!r} cannot deliver {channel} "
            f"(choose from {', '.join(sorted(ALLOWED[channel]))})"
        )
    timeout = s.provider_timeout
    if name == "console":
        return ConsoleProvider()
    if name == "file":
        return FileProvider(s.file_sink_path)
    if name == "inapp":
        return InAppProvider(store)
    if name == "webhook":
        return WebhookProvider(
            reveal(s.webhook_secret),
            timeout=s.webhook_timeout,
            allowed_networks=s.webhook_allowed_networks,
            concurrency=s.concurrency_for("webhook"),
        )
    if name == "resend":
        return ResendProvider(
            reveal(s.resend_api_key), s.email_from, base_url=s.resend_base_url, timeout=timeout
        )
    if name == "sendgrid":
        return SendGridProvider(
            reveal(s.sendgrid_api_key), s.email_from, base_url=s.sendgrid_base_url, timeout=timeout
        )
    if name == "smtp":
        return SmtpProvider(
            s.smtp_host,
            s.email_from,
            port=s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username,
            password=reveal(s.smtp_password),
            ca_file=s.smtp_ca_file,
            timeout=timeout,
            connections=s.smtp_connections,
        )
    if name == "twilio":
        callback = f"{s.public_base_url.rstrip('/')}/webhooks/twilio" if s.public_base_url else None
        return TwilioProvider(
            s.twilio_account_sid,
            reveal(s.twilio_auth_token),
            sender=s.twilio_from,
            messaging_service_sid=s.twilio_messaging_service_sid,
            region=s.sms_default_region,
            status_callback=callback,
            base_url=s.twilio_base_url,
            timeout=timeout,
        )
    if name == "fcm":
        return FcmProvider(reveal(s.fcm_service_account), base_url=s.fcm_base_url, timeout=timeout)
    if name == "webpush":
        return WebPushProvider(
            reveal(s.webpush_vapid_private_key),
            s.webpush_subject,
            ttl=s.webpush_ttl,
            timeout=timeout,
            allowed_networks=s.webhook_allowed_networks,
        )
    raise ConfigError(f"unknown provider {name!r}")


def _slot(provider: Provider, s: Settings) -> ProviderSlot:
    spec = s.rate_limits.get(provider.name, DEFAULT_RATES.get(provider.name))
    bucket = TokenBucket(*parse_rate(spec)) if spec else None
    breaker = CircuitBreaker(
        threshold=s.circuit_failure_threshold, open_seconds=s.circuit_open_seconds
    )
    return ProviderSlot(provider, breaker, bucket)


def build_providers(settings: Settings, store: QueueStore) -> dict[str, ChannelProviders]:
    """Each served channel's providers (a missing key disables the channel, nonsense raises)."""
    unknown = set(settings.rate_limits) - set().union(*ALLOWED.values())
    if unknown:
        raise ConfigError(f"PGNOTIFY_RATE_LIMITS: unknown provider(s) {', '.join(sorted(unknown))}")
    built: dict[str, ChannelProviders] = {}
    for channel in settings.channels:
        entry = ChannelProviders(channel)
        reasons = []
        for name in settings.providers_for(channel):
            try:
                entry.slots.append(_slot(_build_one(name, channel, settings, store), settings))
            except ProviderConfigError as exc:
                reasons.append(str(exc))
        if not entry.slots:
            entry.disabled_reason = "; ".join(reasons) or "no provider configured"
            log.error(
                "channel %s is off: %s (its rows stay queued)",
                channel,
                entry.disabled_reason,
                extra={"action": "channel_disabled", "channel": channel},
            )
        elif reasons:
            log.warning(
                "channel %s runs without %s",
                channel,
                "; ".join(reasons),
                extra={"action": "provider_disabled", "channel": channel},
            )
        built[channel] = entry
    return built
