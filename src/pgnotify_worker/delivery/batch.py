"""Batch sends: a claimed broadcast goes out in as few provider requests as the API allows
(Resend's POST /emails/batch, SendGrid personalizations, one INSERT for the in-app inbox), and
every notification still gets its own outcome, events and idempotency key.

Each row is decided (preferences, suppressions, expiry) and rendered on its own, exactly as a
single send; the rows that are to be sent are grouped by the provider's `batch_key` (what must
be equal to share a request), cut to the batch size with each recipient at most once per
request, and each group is one `send_batch` call. What comes back is classified per row:

- answered per message (a partly rejected batch): each row takes its own outcome (the refused
  ones fail with their own error, the others are sent with their own provider id);
- failed as a whole with a 5xx or a timeout (it is unknown what the provider accepted): the same
  request is sent again at once, up to `retries` times, with the same bytes and so the same
  Idempotency-Key (Resend answers a replay from its record instead of sending twice); when the
  retries are spent every row is retried on its own schedule (an attempt spent);
- 429: the provider is paused for every replica until its Retry-After (delivery.limits) and the
  rows wait, spending no attempt (the request was refused, so regrouping them later is safe);
- a paused provider or an open circuit before the request: the rows go one by one through the
  channel's failover chain, as single sends do.

Rate limits count requests: a batching provider's shared token pays for one request of up to
its batch size (Failover.rows_per_token), its circuit sees one answer per request. Providers
that name destinations (webhooks, Web Push: per-destination caps and breakers) never batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from pgnotify_worker.delivery.dispatcher import Delivery, Dispatcher
from pgnotify_worker.delivery.failover import ProviderSlot
from pgnotify_worker.errors import StoreError
from pgnotify_worker.models import (
    Notification,
    Outcome,
    RenderedMessage,
    Retryable,
    Sent,
)
from pgnotify_worker.ports import BatchProvider

log = logging.getLogger(__name__)

# Batch requests one channel keeps in flight per worker: its row limit is this many batches.
BATCHES_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Which providers batch, how many messages per request, how a failed request is retried."""

    providers: frozenset[str] = frozenset()
    sizes: Mapping[str, int] = field(default_factory=dict)  # provider -> messages per request
    retries: int = 2  # the same request again after a 5xx or a timeout
    retry_wait: float = 0.25  # first wait between those; doubles, at most `retry_wait_cap`
    retry_wait_cap: float = 5.0


@dataclass(slots=True)
class _Ready:
    """A row that was decided and rendered and is to be sent."""

    n: Notification
    message: RenderedMessage
    version: int | None
    started: float


class BatchSender:
    """Delivers a claimed chunk of one channel's rows with batch requests where its provider
    takes them; the rest as single sends through the dispatcher."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        config: BatchSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.sleep = sleep
        failover = dispatcher.failover
        for entry in failover.channels.values():
            for slot in entry.slots:
                size = self._size_of(slot)
                if size > 1:  # its shared rate limit counts requests of up to `size` rows
                    failover.rows_per_token[slot.name] = size

    # --- which rows batch -----------------------------------------------------------------------

    def _size_of(self, slot: ProviderSlot) -> int:
        provider = slot.provider
        if (
            slot.name not in self.config.providers
            or not isinstance(provider, BatchProvider)
            or getattr(provider, "destination", None) is not None
        ):
            return 0
        wanted = self.config.sizes.get(slot.name, provider.batch_limit)
        return max(1, min(wanted, provider.batch_limit))

    def _slot(self, channel: str) -> ProviderSlot | None:
        """The provider the channel's rows go to now, when it batches (as Failover.budget picks
        it: the first whose circuit allows a send and which is not paused)."""
        failover = self.dispatcher.failover
        entry = failover.channels.get(channel)
        if entry is None:
            return None
        now = failover.clock()
        for slot in entry.slots:
            paused = failover.limits.paused_for(slot.name) if failover.limits else 0.0
            if paused > 0 or not slot.breaker.allows(now):
                continue
            return slot if self._size_of(slot) > 1 else None
        return None

    def size(self, channel: str) -> int:
        """Rows per batch request for the channel now; 0 when its rows go one by one."""
        slot = self._slot(channel)
        return self._size_of(slot) if slot is not None else 0

    def row_limit(self, channel: str, concurrency: int) -> int:
        """Rows the channel may hold in flight: `concurrency` sends, or, when a provider of it
        batches, BATCHES_IN_FLIGHT (at most `concurrency`) requests of its batch size."""
        entry = self.dispatcher.failover.channels.get(channel)
        sizes = [self._size_of(slot) for slot in entry.slots] if entry else []
        size = max(sizes, default=0)
        if size < 2:
            return concurrency
        return max(concurrency, size * min(concurrency, BATCHES_IN_FLIGHT))

    # --- delivering -------------------------------------------------------------------------------

    async def deliver(self, channel: str, rows: Sequence[Notification]) -> list[Delivery]:
        """Every row's Delivery (in the order of `rows`). Never raises for a failed send."""
        slot = self._slot(channel)
        if slot is None or len(rows) < 2:
            return list(await asyncio.gather(*(self.dispatcher.deliver(n) for n in rows)))
        provider = cast(BatchProvider, slot.provider)
        done: dict[int, Delivery] = {}
        ready: list[_Ready] = []
        alone: list[Notification] = []
        handles = getattr(provider, "handles", None)
        for n in rows:
            if (n.channel == "push" and n.recipient.startswith("user:")) or (
                handles is not None and not handles(n.recipient)
            ):
                alone.append(n)  # device fan-out, or an address another provider takes
                continue
            composed = await self._compose(n)
            if isinstance(composed, Delivery):
                done[n.id] = composed
            else:
                ready.append(composed)
        groups = self._groups(provider, ready)
        try:
            answers = await asyncio.gather(
                *(self._send_group(slot, channel, group) for group in groups),
                *(self.dispatcher.deliver(n) for n in alone),
            )
            for group, answer in zip(groups, answers, strict=False):
                outcomes = cast(list[tuple[Outcome, str]], answer)
                for item, (outcome, name) in zip(group, outcomes, strict=True):
                    done[item.n.id] = await self._finish(item, outcome, name)
            for n, answer in zip(alone, answers[len(groups) :], strict=True):
                done[n.id] = cast(Delivery, answer)
        finally:
            for item in ready:
                self.dispatcher.failover.settled(item.n.id)
        return [done[n.id] for n in rows]

    def _groups(self, provider: BatchProvider, ready: list[_Ready]) -> list[list[_Ready]]:
        """Rows that may share a request, at most `size` per request and each recipient once
        per request (SendGrid refuses a repeated address)."""
        size = self._size_of_provider(provider)
        by_key: dict[Hashable, list[tuple[list[_Ready], set[str]]]] = {}
        for item in ready:
            chunks = by_key.setdefault(provider.batch_key(item.message), [])
            recipient = item.message.recipient
            for chunk, recipients in chunks:
                if len(chunk) < size and recipient not in recipients:
                    chunk.append(item)
                    recipients.add(recipient)
                    break
            else:
                chunks.append(([item], {recipient}))
        return [chunk for chunks in by_key.values() for chunk, _ in chunks]

    def _size_of_provider(self, provider: BatchProvider) -> int:
        wanted = self.config.sizes.get(provider.name, provider.batch_limit)
        return max(1, min(wanted, provider.batch_limit))

    async def _compose(self, n: Notification) -> _Ready | Delivery:
        """Decide and render one row as the single-row path does (Dispatcher.compose)."""
        started = time.perf_counter()
        prepared = await self.dispatcher.compose(n, started)
        if isinstance(prepared, Delivery):
            return prepared
        message, version = prepared
        return _Ready(n, message, version, started)

    async def _finish(self, item: _Ready, outcome: Outcome, provider: str) -> Delivery:
        n = item.n
        await self.dispatcher._after_send(n, n.channel, n.recipient, outcome, provider)
        return self.dispatcher.resolved(n, outcome, provider, item.started, item.version)

    # --- one request ------------------------------------------------------------------------------

    async def _send_group(
        self, slot: ProviderSlot, channel: str, group: list[_Ready]
    ) -> list[tuple[Outcome, str]]:
        """One batch request for the group (again after a 5xx or a timeout, the same request);
        (outcome, provider) per row."""
        failover = self.dispatcher.failover
        limits = failover.limits
        provider = cast(BatchProvider, slot.provider)
        messages = [item.message for item in group]
        wait = self.config.retry_wait
        tries = 0
        while True:
            before = slot.breaker.state
            paused = limits is not None and limits.paused_for(slot.name) > 0
            if paused or not slot.breaker.acquire(failover.clock()):
                return await self._one_by_one(channel, messages)  # the failover chain decides
            if slot.breaker.state is not before:
                failover.on_circuit(slot.name, slot.breaker)  # open -> half-open: the probe
                before = slot.breaker.state
            result: Sequence[Outcome] | Outcome | None = None
            try:
                if limits is not None:
                    try:
                        token = await limits.admit_batch(
                            slot.name, [m.notification_id for m in messages]
                        )
                    except StoreError:
                        untried = Retryable(
                            "database",
                            "rate limit lookup failed: database unavailable",
                            tried=False,
                        )
                        return [(untried, "none")] * len(messages)
                    if token is None:  # paused by another replica meanwhile (probe freed below)
                        return await self._one_by_one(channel, messages)
                    if token > 0:
                        await self.sleep(token)
                result = await self._call(provider, messages)
            finally:
                if result is None:  # cancelled before an answer: free a half-open probe
                    slot.breaker.release()
            if not isinstance(result, Outcome):
                failover._record(slot, Sent(None), before)  # the provider answered
                return [(outcome, slot.name) for outcome in result]
            failover._record(slot, result, before)
            if isinstance(result, Retryable) and result.throttled and limits is not None:
                await limits.throttled(slot.name, result.retry_after, result.message)
            if (
                isinstance(result, Retryable)
                and result.tried
                and not result.throttled
                and not result.trip
                and tries < self.config.retries
                and slot.breaker.allows(failover.clock())
            ):
                tries += 1
                pause = min(result.retry_after or wait, self.config.retry_wait_cap)
                wait = min(wait * 2, self.config.retry_wait_cap)
                log.warning(
                    "batch of %s %s failed as a whole (%s): the same request again in %.2fs",
                    len(messages),
                    slot.name,
                    result.message,
                    pause,
                    extra={"action": "batch_retry", "provider": slot.name, "count": len(messages)},
                )
                await self.sleep(pause)
                continue
            return [(result, slot.name)] * len(messages)

    async def _call(
        self, provider: BatchProvider, messages: list[RenderedMessage]
    ) -> Sequence[Outcome] | Outcome:
        try:
            result = await provider.send_batch(messages)
        except Exception:  # a provider bug must not kill the worker; the rows are retried
            log.exception(
                "provider %s raised while sending a batch of %s",
                provider.name,
                len(messages),
                extra={"action": "provider_crash", "count": len(messages)},
            )
            return Retryable(
                "provider_crash", f"provider {provider.name} raised an unexpected error"
            )
        if not isinstance(result, Outcome) and len(result) != len(messages):
            log.error(
                "provider %s answered %s outcomes for a batch of %s",
                provider.name,
                len(result),
                len(messages),
                extra={"action": "provider_crash", "count": len(messages)},
            )
            return Retryable("provider_crash", f"provider {provider.name} answered a short batch")
        return result

    async def _one_by_one(
        self, channel: str, messages: list[RenderedMessage]
    ) -> list[tuple[Outcome, str]]:
        """The batching provider is paused: each message through the channel's failover chain."""
        return list(
            await asyncio.gather(*(self.dispatcher.send_chain(channel, m) for m in messages))
        )
