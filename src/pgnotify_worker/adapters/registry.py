"""The providers table (every provider module's SPECS) made into each channel's providers:
build each channel's providers from settings; a provider that cannot start disables its channel
with a reason (shown at start-up and in /status) instead of crashing mid-run."""

from __future__ import annotations

import logging

from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.adapters.inbound import Endpoint
from pgnotify_worker.adapters.providers.catalog import provider_specs
from pgnotify_worker.adapters.providers.spec import Context
from pgnotify_worker.config import Settings
from pgnotify_worker.core.circuit import CircuitBreaker
from pgnotify_worker.core.ratelimit import parse_rate
from pgnotify_worker.delivery.failover import ChannelProviders, ProviderSlot
from pgnotify_worker.errors import ConfigError, ProviderConfigError
from pgnotify_worker.ports import Provider

log = logging.getLogger(__name__)


def _build_one(name: str, channel: str, s: Settings, store: QueueStore) -> Provider:
    specs = provider_specs()
    spec = specs.get(name)
    if spec is None or channel not in spec.channels:
        usable = sorted(n for n, sp in specs.items() if channel in sp.channels)
        raise ConfigError(
            f"PGNOTIFY_{channel.upper()}_PROVIDERS: {name!r} cannot deliver {channel} "
            f"(choose from {', '.join(usable)})"
        )
    return spec.create(s, Context(s, store))


def _slot(provider: Provider, s: Settings) -> ProviderSlot:
    known = provider_specs().get(provider.name)
    spec = s.rate_limits.get(provider.name, known.default_rate if known else None)
    rate = parse_rate(spec) if spec else None  # shared by all replicas: delivery.limits
    breaker = CircuitBreaker(
        threshold=s.circuit_failure_threshold, open_seconds=s.circuit_open_seconds
    )
    return ProviderSlot(provider, breaker, rate)


async def share_limits(
    providers: dict[str, ChannelProviders], store: QueueStore
) -> dict[str, tuple[float, float]]:
    """Store each rate-limited provider's rate and burst in pgnotify.provider_limits, where
    every replica takes its tokens; says so when this replica changes what another stored."""
    rates = {
        slot.name: slot.rate
        for entry in providers.values()
        for slot in entry.slots
        if slot.rate is not None
    }
    for name, (rate, burst) in sorted(rates.items()):
        before = await store.upsert_limit(name, rate, burst)
        if before is not None and before != (rate, burst):
            log.warning(
                "rate limit of %s changed from %g/%g to %g/%g for every replica "
                "(give all replicas the same PGNOTIFY_RATE_LIMITS)",
                name,
                *before,
                rate,
                burst,
                extra={"action": "rate_limit_changed", "provider": name},
            )
    return rates


def build_providers(settings: Settings, store: QueueStore) -> dict[str, ChannelProviders]:
    """Each served channel's providers (a missing key disables the channel, nonsense raises)."""
    unknown = set(settings.rate_limits) - set(provider_specs())
    if unknown:
        raise ConfigError(f"PGNOTIFY_RATE_LIMITS: unknown provider(s) {', '.join(sorted(unknown))}")
    built: dict[str, ChannelProviders] = {}
    for channel in settings.channels:
        entry = ChannelProviders(channel)
        reasons = []
        names = settings.providers_for(channel)
        for name in names:
            try:
                entry.slots.append(_slot(_build_one(name, channel, settings, store), settings))
            except ProviderConfigError as exc:
                reasons.append(str(exc))
        specs = provider_specs()
        entry.dev_only = bool(entry.slots) and all(
            specs[slot.name].dev_sink for slot in entry.slots if slot.name in specs
        )
        if not names:
            real = sorted(n for n, p in specs.items() if channel in p.channels and not p.dev_sink)
            reasons.append(
                f"no provider configured: set PGNOTIFY_{channel.upper()}_PROVIDERS (to one of "
                f"{', '.join(real)}), or PGNOTIFY_SIMULATE=true to print them to the console"
            )
        if not entry.slots:
            entry.disabled_reason = "; ".join(reasons)
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


def inbound_endpoints(settings: Settings) -> list[Endpoint]:
    """The delivery-report endpoints of every provider whose signing key is configured."""
    found = (spec.endpoint(settings) for spec in provider_specs().values())
    return [endpoint for endpoint in found if endpoint is not None]
