"""Isolation per destination: for a provider that sends to many independent hosts (webhooks, Web
Push), one endpoint's failures or slowness must not hold back the others. Each destination (the
endpoint's origin, as the provider names it) gets its own circuit breaker with a growing pause,
a cap on the sends it may have in flight (a bounded share of the channel's slots), and, when it
keeps failing for `disable_after` seconds, is disabled in the database until
pgnotify.enable_destination(origin).

A row for a paused or busy destination is not sent and spends no attempt: it is rescheduled
(Retryable tried=False) when the pause ends or a slot of that destination is likely free, so it
never holds a channel slot while it waits. A row for a disabled destination fails at once
(destination_disabled)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.errors import StoreError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable
from pgnotify_worker.ports import DeliveryStore

log = logging.getLogger(__name__)

OPENED = "opened"
RECOVERED = "recovered"
MIN_BUSY_WAIT = 0.5  # seconds a row for a busy destination waits at least
QUICK = 0.1  # a destination answering faster than this on average: wait for its slot in memory


@dataclass(slots=True)
class Destination:
    """One destination's breaker, sends in flight and typical answer time."""

    key: str
    breaker: CircuitBreaker
    in_flight: int = 0
    answer_seconds: float = 0.0  # moving average of a send's duration (0: none answered yet)
    busy_since: float = 0.0  # when its sends in flight went from none to one
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def freed(self) -> None:
        """A send ended: wake the first row waiting for a slot of this destination."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def idle(self) -> bool:
        """Nothing to remember: dropping it loses no state (it is rebuilt on the next send)."""
        b = self.breaker
        idle = self.in_flight == 0 and not self.waiters
        return idle and b.state is CircuitState.CLOSED and b.failures == 0


class Destinations:
    """The destinations seen by this worker (bounded), and what the database says is failing or
    disabled (refreshed by watch())."""

    def __init__(
        self,
        caps: dict[str, int],
        *,
        threshold: int = 5,
        open_seconds: float = 30.0,
        max_open_seconds: float = 3600.0,
        disable_after: float = 259_200.0,
        store: DeliveryStore | None = None,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[int, int], None] = lambda _disabled, _open: None,
    ) -> None:
        self.caps = caps
        self.threshold = threshold
        self.open_seconds = open_seconds
        self.max_open_seconds = max(open_seconds, max_open_seconds)
        self.disable_after = disable_after
        self.store = store
        self.max_entries = max_entries
        self.clock = clock
        self.on_refresh = on_refresh
        self.entries: dict[str, Destination] = {}
        self.failing: set[str] = set()  # recorded as failing in pgnotify.destinations
        self.disabled: dict[str, str] = {}  # origin -> why (from pgnotify.destinations)

    # --- the hot path ------------------------------------------------------------------------

    def get(self, key: str) -> Destination:
        """The destination's state, created on first use."""
        found = self.entries.get(key)
        if found is None:
            if len(self.entries) >= self.max_entries:
                self._evict()
            found = self.entries[key] = Destination(
                key, CircuitBreaker(threshold=self.threshold, open_seconds=self.open_seconds)
            )
        return found

    def _evict(self) -> None:
        """Forget idle healthy destinations, oldest first, down to three quarters of the bound
        (a paused or busy one is kept: its state matters)."""
        target = self.max_entries * 3 // 4
        for key in [k for k, d in self.entries.items() if d.idle]:
            if len(self.entries) <= target:
                break
            del self.entries[key]

    async def admit(self, key: str, channel: str) -> Destination | Outcome:
        """Take a send slot of the destination, or why the row must wait (no attempt spent) or
        fail (disabled). At its cap, a quick destination's row waits in memory for a slot (a
        few of its answers' time: cheaper than a round trip to the database); a slow one's goes
        back to the queue at once, freeing its channel slot for other destinations."""
        reason = self.disabled.get(key)
        if reason is not None:
            return Permanent(
                "destination_disabled",
                f"destination {key} is disabled ({reason}); re-enable it with "
                f"SELECT pgnotify.enable_destination('{key}')",
            )
        dest = self.get(key)
        cap = self.caps.get(channel, 1)
        tries = 0
        while dest.in_flight >= cap and self._quick(dest):
            if tries == 3:  # no slot came free: it is not quick (any more)
                dest.answer_seconds = max(dest.answer_seconds, QUICK)
                break
            tries += 1
            waiter = asyncio.get_running_loop().create_future()
            dest.waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, QUICK)
        if dest.in_flight >= cap:
            return Retryable(
                "destination_busy",
                f"destination {key} already has {dest.in_flight} sends in flight (its share of "
                f"the channel: {cap})",
                max(MIN_BUSY_WAIT, dest.answer_seconds),
                tried=False,
            )
        now = self.clock()
        if not dest.breaker.acquire(now):
            return Retryable(
                "destination_paused",
                f"destination {key} is paused after failures: {dest.breaker.reason}",
                dest.breaker.opens_in(now) or MIN_BUSY_WAIT,
                tried=False,
            )
        dest.in_flight += 1
        if dest.in_flight == 1:
            dest.busy_since = now
        return dest

    def _quick(self, dest: Destination) -> bool:
        """Does a slot of this destination come free soon? Its average answer time says; before
        its first answer, whether its sends have been out for less than QUICK so far."""
        if dest.answer_seconds:
            return dest.answer_seconds < QUICK
        return self.clock() - dest.busy_since < QUICK

    def release(self, dest: Destination) -> None:
        """A send that ended without an answer (cancelled)."""
        dest.in_flight -= 1
        dest.breaker.release()
        dest.freed()

    def finish(self, dest: Destination, outcome: Outcome, seconds: float) -> str | None:
        """Feed the destination's breaker with an answer: OPENED when its circuit opened now,
        RECOVERED when a destination recorded as failing answered again."""
        dest.in_flight -= 1
        dest.freed()
        dest.answer_seconds = (
            seconds if dest.answer_seconds == 0 else 0.8 * dest.answer_seconds + 0.2 * seconds
        )
        breaker = dest.breaker
        if isinstance(outcome, Retryable):
            if outcome.throttled or outcome.trip:  # up but slowing us, or provider-wide
                breaker.release()
                return None
            reopening = breaker.state is CircuitState.HALF_OPEN
            if breaker.failure(self.clock(), outcome.message):
                if reopening:  # the probe failed too: pause longer (back-off per destination)
                    breaker.open_seconds = min(self.max_open_seconds, 2 * breaker.open_seconds)
                return OPENED
            return None
        breaker.success()
        breaker.open_seconds = self.open_seconds
        return RECOVERED if dest.key in self.failing else None

    # --- the database side: failing since when, disabled -------------------------------------

    async def report(
        self, event: str, dest: Destination, message: RenderedMessage, provider: str
    ) -> None:
        """Record a transition in pgnotify.destinations; a destination failing for longer than
        disable_after is disabled there, with an event on this notification. Never raises."""
        if self.store is None:
            return
        key = dest.key
        try:
            if event == RECOVERED:
                await self.store.destination_recovered(key)
                self.failing.discard(key)
                log.info(
                    "destination %s answers again",
                    key,
                    extra={"action": "destination_recovered", "provider": provider},
                )
                return
            reason = dest.breaker.reason or "failing"
            disabled, since = await self.store.destination_failing(key, reason, self.disable_after)
            self.failing.add(key)
            log.warning(
                "destination %s paused for %.0fs (failing for %.0fs): %s",
                key,
                dest.breaker.open_seconds,
                since,
                reason,
                extra={"action": "destination_paused", "provider": provider},
            )
            if not disabled:
                return
            why = f"failing for {since:.0f}s, last error: {reason}"
            self.disabled[key] = why
            log.error(
                "destination %s disabled: %s",
                key,
                why,
                extra={
                    "action": "destination_disabled",
                    "provider": provider,
                    "notification_id": message.notification_id,
                },
            )
            await self.store.note(
                message.notification_id,
                "destination_disabled",
                message.attempt,
                provider=provider,
                error_code="destination_disabled",
                error=f"destination {key} disabled: {why}",
                detail={"destination": key, "failing_seconds": round(since)},
            )
        except StoreError as exc:
            log.warning(
                "could not record the state of destination %s: %s",
                key,
                type(exc).__name__,
                extra={"action": "destination_record_failed"},
            )

    async def refresh(self) -> None:
        """Read which destinations are failing or disabled (other replicas' findings, SQL
        re-enables) and report the counts."""
        if self.store is None:
            return
        rows = await self.store.destinations()
        self.failing = {origin for origin, _, _ in rows}
        self.disabled = {origin: reason or "disabled" for origin, off, reason in rows if off}
        paused = sum(1 for d in self.entries.values() if d.breaker.state is not CircuitState.CLOSED)
        self.on_refresh(len(self.disabled), paused)

    async def watch(self, interval: float) -> None:
        """refresh() every `interval` seconds, for ever (a background task of the worker)."""
        while True:
            try:
                await self.refresh()
            except StoreError as exc:
                log.warning(
                    "could not read destinations: %s",
                    type(exc).__name__,
                    extra={"action": "destinations_failed"},
                )
            await anyio.sleep(interval)

    def describe(self, limit: int = 20) -> dict[str, object]:
        """For /status: counts and the paused destinations (a few)."""
        now = self.clock()
        paused = {
            key: {
                "state": d.breaker.state.value,
                "last_failure": d.breaker.reason,
                "probe_in_seconds": round(d.breaker.opens_in(now), 1),
            }
            for key, d in self.entries.items()
            if d.breaker.state is not CircuitState.CLOSED
        }
        return {
            "tracked": len(self.entries),
            "in_flight_cap": self.caps,
            "paused": dict(list(paused.items())[:limit]),
            "paused_count": len(paused),
            "disabled": sorted(self.disabled)[:limit],
            "disabled_count": len(self.disabled),
        }
