"""Build each channel's providers from settings; a provider that cannot start disables its channel
with a reason (shown at start-up and in /status) instead of crashing mid-run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.adapters.providers.devsinks import ConsoleProvider, FileProvider
from pgnotify_worker.adapters.providers.inapp import InAppProvider
from pgnotify_worker.adapters.providers.webhook import WebhookProvider
from pgnotify_worker.config import Settings
from pgnotify_worker.errors import ConfigError, ProviderConfigError
from pgnotify_worker.ports import Provider

log = logging.getLogger(__name__)

# Which provider names make sense on which channel.
ALLOWED = {
    "email": {"console", "file"},
    "sms": {"console", "file"},
    "push": {"console", "file"},
    "webhook": {"webhook", "console", "file"},
    "inapp": {"inapp", "console", "file"},
}


@dataclass
class ChannelProviders:
    """The providers of one channel in failover order, or why the channel is off."""

    channel: str
    providers: list[Provider] = field(default_factory=list)
    disabled_reason: str | None = None


def _build_one(name: str, channel: str, settings: Settings, store: QueueStore) -> Provider:
    if name not in ALLOWED[channel]:
        raise ConfigError(
            f"PGNOTIFY_{channel.upper()}_PROVIDERS: {name!r} cannot deliver {channel} "
            f"(choose from {', '.join(sorted(ALLOWED[channel]))})"
        )
    if name == "console":
        return ConsoleProvider()
    if name == "file":
        return FileProvider(settings.file_sink_path)
    if name == "inapp":
        return InAppProvider(store)
    if name == "webhook":
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        return WebhookProvider(
            secret,
            timeout=settings.webhook_timeout,
            allowed_networks=settings.webhook_allowed_networks,
            concurrency=settings.concurrency_for("webhook"),
        )
    raise ConfigError(f"unknown provider {name!r}")


def build_providers(settings: Settings, store: QueueStore) -> dict[str, ChannelProviders]:
    """Each served channel's providers (a missing key disables the channel, nonsense raises)."""
    built: dict[str, ChannelProviders] = {}
    for channel in settings.channels:
        entry = ChannelProviders(channel)
        reasons = []
        for name in settings.providers_for(channel):
            try:
                entry.providers.append(_build_one(name, channel, settings, store))
            except ProviderConfigError as exc:
                reasons.append(f"{name}: {exc}")
        if not entry.providers:
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
