"""Failover across a channel's providers: circuit breakers, shared rate limits (delivery.limits),
the next provider when one fails or is paused."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.delivery.destinations import Destination, Destinations
from pgnotify_worker.delivery.limits import Budget, SharedLimits
from pgnotify_worker.errors import StoreError
from pgnotify_worker.models import Notification, Outcome, Permanent, RenderedMessage, Retryable
from pgnotify_worker.ports import Provider

log = logging.getLogger(__name__)


@dataclass
class ProviderSlot:
    """A provider with its circuit breaker and (optional) rate limit: (per second, burst),
    shared by every replica (delivery.limits)."""

    provider: Provider
    breaker: CircuitBreaker
    rate: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return self.provider.name


@dataclass
class ChannelProviders:
    """The providers of one channel in failover order, or why the channel is off."""

    channel: str
    slots: list[ProviderSlot] = field(default_factory=list)
    disabled_reason: str | None = None
    dev_only: bool = False  # every provider is a dev sink (console, file): the user chose that


class Failover:
    """Sends one message through the first provider of its channel that takes it."""

    def __init__(
        self,
        channels: dict[str, ChannelProviders],
        *,
        on_circuit: Callable[[str, CircuitBreaker], None] = lambda _p, _b: None,
        on_failover: Callable[[str, str], None] = lambda _c, _p: None,
        clock: Callable[[], float] = time.monotonic,
        destinations: Destinations | None = None,
        limits: SharedLimits | None = None,
    ) -> None:
        self.channels = channels
        self.destinations = destinations or Destinations({}, clock=clock)
        self.limits = limits  # None: no rate limit applies (tests of failover alone)
        self.rows_per_token: dict[str, int] = {}  # batching providers: a token pays a request
        self.on_circuit = on_circuit
        self.on_failover = on_failover
        self.clock = clock

    def capacity(self, channel: str, free: int) -> int:
        """Rows to claim: every free slot while a provider's circuit is closed, one probe while
        the best is half-open, none while all are open (nothing is burned on a dead service)."""
        slots = self.channels[channel].slots
        if any(slot.breaker.state is CircuitState.CLOSED for slot in slots):
            return free
        now = self.clock()
        return min(free, 1) if any(slot.breaker.allows(now) for slot in slots) else 0

    def rate_limited(self, channel: str) -> bool:
        """Does a shared rate limit apply to any provider of the channel?"""
        limits = self.limits
        return limits is not None and any(
            limits.limited(slot.name) for slot in self.channels[channel].slots
        )

    def blocked_for(self, channel: str) -> float:
        """Seconds until some provider of the channel may be tried again."""
        now = self.clock()
        return min((slot.breaker.opens_in(now) for slot in self.channels[channel].slots), default=0)

    # --- shared rate limits (delivery.limits) ----------------------------------------------------

    async def budget(self, channel: str, wanted: int) -> Budget:
        """Tokens for a claim of up to `wanted` rows, from the provider the rows will go to: the
        first in failover order whose circuit allows a send and which is not paused (a pause
        learnt here moves on to the next). Raises StoreError."""
        if self.limits is None:
            return Budget(None, wanted)
        now = self.clock()
        waits = []
        for slot in self.channels[channel].slots:
            if not slot.breaker.allows(now):
                continue
            paused = self.limits.paused_for(slot.name)
            if paused <= 0 and not self.limits.limited(slot.name):
                return Budget(None, wanted)
            if paused <= 0:
                per = self.rows_per_token.get(slot.name, 1)
                grant = await self.limits.take(slot.name, -(-wanted // per))
                if grant.paused_for <= 0:
                    granted = min(wanted, grant.granted * per)
                    return Budget(slot.name, granted, grant.next_in, per)
                paused = grant.paused_for
            waits.append(paused)
        return Budget(None, 0, min(waits, default=self.blocked_for(channel)))

    async def give_back(self, budget: Budget, claimed: list[Notification]) -> None:
        """The claimed rows hold their provider's tokens; the rest go back."""
        if self.limits is not None and budget.provider is not None:
            self.limits.paid((n.id for n in claimed), budget.provider)
            await self.limits.give_back(budget.provider, budget.unused(len(claimed)))

    def settled(self, notification_id: int) -> None:
        """A delivery is over: forget its token."""
        if self.limits is not None:
            self.limits.forget(notification_id)

    def _paused_for(self, slot: ProviderSlot) -> float:
        return self.limits.paused_for(slot.name) if self.limits is not None else 0.0

    async def _call(self, provider: Provider, message: RenderedMessage) -> Outcome:
        try:
            return await provider.send(message)
        except Exception:  # a provider bug must not kill the worker; the attempt is retried
            log.exception(
                "provider %s raised while sending notification %s",
                provider.name,
                message.notification_id,
                extra={"action": "provider_crash", "notification_id": message.notification_id},
            )
            return Retryable(
                "provider_crash", f"provider {provider.name} raised an unexpected error"
            )

    def _record(
        self, slot: ProviderSlot, outcome: Outcome, before: CircuitState, *, own: bool = True
    ) -> None:
        """Feed the provider's circuit: an answer closes it, a run of failures opens it. A
        failure of one destination (`own` False) is that destination's, not the provider's:
        only a trip (provider-wide: bad credentials) counts."""
        breaker = slot.breaker
        if not own and isinstance(outcome, Retryable) and not outcome.trip:
            breaker.release()  # a half-open probe ends without a verdict
            return
        if isinstance(outcome, Retryable) and not outcome.throttled:
            if breaker.failure(self.clock(), outcome.message, trip=outcome.trip):
                log.warning(
                    "provider %s paused for %.0fs: %s",
                    slot.name,
                    breaker.open_seconds,
                    outcome.message,
                    extra={"action": "circuit_open", "provider": slot.name},
                )
        else:
            breaker.success()
            if before is not CircuitState.CLOSED:
                log.info(
                    "provider %s answers again",
                    slot.name,
                    extra={"action": "circuit_closed", "provider": slot.name},
                )
        if breaker.state is not before:
            self.on_circuit(slot.name, breaker)

    async def _destination(
        self, slot: ProviderSlot, channel: str, message: RenderedMessage
    ) -> Destination | Outcome | None:
        """For a provider that names destinations (webhooks: the URL's origin), a send slot of
        this one, or why the row waits or fails; None for a single-API provider."""
        destination_of = getattr(slot.provider, "destination", None)
        key = destination_of(message.recipient) if destination_of is not None else None
        if key is None:
            return None
        return await self.destinations.admit(key, channel)

    async def send_chain(self, channel: str, message: RenderedMessage) -> tuple[Outcome, str]:
        """Try the channel's providers in order: a retryable failure or an open circuit moves on
        to the next; the first answer that is not retryable (or the last failure) wins."""
        last: tuple[Outcome, str] | None = None
        moved_on = False
        for slot in self.channels[channel].slots:
            handles = getattr(slot.provider, "handles", None)  # an address this provider can use?
            if handles is not None and not handles(message.recipient):
                continue
            if self._paused_for(slot) > 0:
                moved_on = True  # rate-limit pause (a 429): the next provider takes it
                continue
            before = slot.breaker.state
            if not slot.breaker.acquire(self.clock()):
                moved_on = True  # paused: the next provider takes it
                continue
            if slot.breaker.state is not before:
                self.on_circuit(slot.name, slot.breaker)  # open -> half-open: this is the probe
                before = slot.breaker.state
            dest = await self._destination(slot, channel, message)
            if dest is not None and not isinstance(dest, Destination):
                slot.breaker.release()  # a half-open probe that did not go
                return dest, slot.name  # waits or fails for its destination: no other provider
            outcome: Outcome | None = None
            try:
                if self.limits is not None:
                    try:
                        wait = await self.limits.admit(slot.name, message.notification_id)
                    except StoreError:
                        return Retryable(
                            "database",
                            "rate limit lookup failed: database unavailable",
                            tried=False,
                        ), "none"
                    if wait is None:  # paused by another replica: the next provider takes it
                        moved_on = True
                        continue
                    if wait > 0:
                        await asyncio.sleep(wait)
                started = self.clock()
                outcome = await self._call(slot.provider, message)
            finally:
                if outcome is None:  # cancelled before an answer: free the half-open probe
                    slot.breaker.release()
                    if dest is not None:
                        self.destinations.release(dest)
            if dest is not None:
                event = self.destinations.finish(dest, outcome, self.clock() - started)
                if event is not None:
                    await self.destinations.report(event, dest, message, slot.name)
            self._record(slot, outcome, before, own=dest is None)
            if isinstance(outcome, Retryable) and outcome.throttled and self.limits is not None:
                await self.limits.throttled(slot.name, outcome.retry_after, outcome.message)
            if moved_on:
                self.on_failover(channel, slot.name)
            if not isinstance(outcome, Retryable):
                return outcome, slot.name
            last = (outcome, slot.name)
            moved_on = True
        if last is not None:
            return last
        slots = [
            slot
            for slot in self.channels[channel].slots
            if getattr(slot.provider, "handles", lambda _r: True)(message.recipient)
        ]
        if not slots:
            return Permanent("no_provider", f"no {channel} provider handles this address"), "none"
        limits = self.limits
        pauses = [limits.paused_for(slot.name) for slot in slots if limits is not None]
        reasons = "; ".join(
            f"{slot.name}: {(limits and limits.pause_reason(slot.name)) or slot.breaker.reason}"
            for slot in slots
        )
        waits = [w for w in (*pauses, self.blocked_for(channel)) if w > 0]
        return (
            Retryable(
                "rate_limited" if pauses and all(p > 0 for p in pauses) else "circuit_open",
                f"every {channel} provider is paused ({reasons})",
                min(waits) if waits else None,
                tried=False,
            ),
            "none",
        )
