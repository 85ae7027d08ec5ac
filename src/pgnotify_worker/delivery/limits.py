"""Providers' rate limits shared by every replica: the tokens and pauses live in PostgreSQL
(pgnotify.provider_limits, reached through the RateLimitStore port); this process remembers only
which rows it has already paid for and the pauses it has heard of, to skip a paused provider
without asking.

Tokens are taken before a claim, for the provider the channel's rows will go to (the first
provider in failover order whose circuit allows a send and which is not paused), so a worker
claims only what it may send now; tokens the claim could not use are given back. A send that
fails over to another rate-limited provider reserves a token of that provider first (one round
trip, only on failover). A 429 of a rate-limited provider pauses it for every replica until its
Retry-After (or reset header) has passed; a throttled answer that names no wait (an SMTP 4xx about
one mailbox, a bare 429) delays only its row. A provider without a configured limit (webhooks by
default: many independent receivers) has nothing shared to pause: its 429 delays only its row."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pgnotify_worker.errors import StoreError
from pgnotify_worker.models import TokenGrant
from pgnotify_worker.ports import RateLimitStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Budget:
    """What a claim may take: `granted` rows, paid with `provider`'s tokens (None: no limit
    applies); when fewer than asked were granted, `wait` is when asking again is worthwhile."""

    provider: str | None
    granted: int
    wait: float = 0.0
    per: int = 1  # rows one token pays for (a batching provider's token pays for a request)

    def unused(self, claimed: int) -> int:
        """Tokens a claim of `claimed` rows did not need."""
        return -(-self.granted // self.per) - -(-claimed // self.per)


class SharedLimits:
    """The process's side of the shared limits: which providers are limited, known pauses,
    rows already paid for."""

    def __init__(
        self,
        store: RateLimitStore,
        rates: Mapping[str, tuple[float, float]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.rates = dict(rates)  # provider -> (rate per second, burst)
        self.clock = clock
        self._paused: dict[str, tuple[float, str]] = {}  # provider -> (until, why)
        self._paid: dict[int, str] = {}  # notification id -> provider whose token it holds

    def limited(self, provider: str) -> bool:
        """Does a shared rate limit apply to this provider?"""
        return provider in self.rates

    # --- pauses ----------------------------------------------------------------------------------

    def paused_for(self, provider: str) -> float:
        """Seconds this provider is still paused, as far as this process has heard."""
        entry = self._paused.get(provider)
        if entry is None:
            return 0.0
        left = entry[0] - self.clock()
        if left <= 0:
            del self._paused[provider]
            return 0.0
        return left

    def pause_reason(self, provider: str) -> str | None:
        """Why the provider is paused (None when it is not)."""
        return self._paused[provider][1] if self.paused_for(provider) > 0 else None

    def _note_pause(self, provider: str, seconds: float, why: str) -> None:
        until = self.clock() + seconds
        if until > self._paused.get(provider, (0.0, ""))[0]:
            self._paused[provider] = (until, why)

    async def throttled(self, provider: str, retry_after: float | None, reason: str) -> None:
        """A 429 naming its wait: pause the provider for every replica until it is over."""
        if not self.limited(provider) or retry_after is None or retry_after <= 0:
            return  # nothing shared to pause: the row waits by itself (spending no attempt)
        seconds = retry_after
        self._note_pause(provider, seconds, f"rate limited by the provider: {reason}")
        try:
            left = await self.store.pause_provider(provider, seconds, reason)
        except StoreError as exc:
            log.warning(
                "could not share the pause of %s: %s (this replica still waits)",
                provider,
                type(exc).__name__,
                extra={"action": "pause_failed", "provider": provider},
            )
            return
        if left is not None and left > seconds:
            self._note_pause(provider, left, f"rate limited by the provider: {reason}")
        log.warning(
            "provider %s asked us to slow down: paused for every replica for %.1fs",
            provider,
            max(seconds, left or 0.0),
            extra={"action": "provider_paused", "provider": provider},
        )

    # --- tokens ----------------------------------------------------------------------------------

    async def take(self, provider: str, wanted: int) -> TokenGrant:
        """Up to `wanted` tokens now (learning of a pause another replica set). StoreError."""
        grant = await self.store.take_tokens(provider, wanted, self.rates[provider])
        if grant.paused_for > 0:
            self._note_pause(provider, grant.paused_for, "paused: the provider asked to slow down")
        return grant

    async def give_back(self, provider: str, count: int) -> None:
        """Return tokens a claim did not use (best effort: a lost token only slows us down)."""
        if count > 0:
            with contextlib.suppress(StoreError):
                await self.store.give_back_tokens(provider, count)

    def paid(self, ids: Iterable[int], provider: str) -> None:
        """These claimed rows hold a token of `provider`."""
        for nid in ids:
            self._paid[nid] = provider

    def forget(self, notification_id: int) -> None:
        """The row's delivery is over (an unused token is simply not used)."""
        self._paid.pop(notification_id, None)

    async def admit_batch(self, provider: str, ids: Sequence[int]) -> float | None:
        """Before a batch request (one token pays for it): as admit(); a request with a row
        whose claim already paid a token of this provider takes no new one. StoreError."""
        if not self.limited(provider):
            return 0.0
        if self.paused_for(provider) > 0:
            return None
        paid = [nid for nid in ids if self._paid.get(nid) == provider]
        for nid in paid:
            del self._paid[nid]
        if paid:
            return 0.0
        grant = await self.store.take_tokens(provider, 1, self.rates[provider], reserve=True)
        if grant.paused_for > 0:
            self._note_pause(provider, grant.paused_for, "paused: the provider asked to slow down")
            return None
        return grant.ready_in

    async def admit(self, provider: str, notification_id: int) -> float | None:
        """Before a send: seconds to wait for its token (0 when already paid or unlimited), or
        None when the provider is paused. Raises StoreError."""
        if not self.limited(provider):
            return 0.0
        if self.paused_for(provider) > 0:
            return None
        if self._paid.get(notification_id) == provider:
            del self._paid[notification_id]
            return 0.0
        grant = await self.store.take_tokens(provider, 1, self.rates[provider], reserve=True)
        if grant.paused_for > 0:
            self._note_pause(provider, grant.paused_for, "paused: the provider asked to slow down")
            return None
        return grant.ready_in
