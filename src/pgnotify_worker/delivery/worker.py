"""The claim loop: wake on NOTIFY, a timer or a freed slot; claim what fits; send; write back."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.delivery.batch import BatchSender
from pgnotify_worker.delivery.dispatcher import Delivery, Dispatcher
from pgnotify_worker.delivery.templates import TemplateStore
from pgnotify_worker.delivery.wakeups import Wakeups
from pgnotify_worker.errors import StoreError, StoreUnavailable
from pgnotify_worker.models import (
    ListenerState,
    Notification,
    Ping,
    TemplatesChanged,
    Unknown,
    Wake,
    WakeChannel,
    WakeScheduled,
    WakeWorkflows,
)
from pgnotify_worker.ports import DeliveryMetrics, DeliveryStore
from pgnotify_worker.tracing import Tracing

log = logging.getLogger(__name__)
COMPLETE_BATCH = 500
PROMOTE_BATCH = 1000


@dataclass
class ChannelState:
    """Claiming state of one channel in this worker.

    Under a backlog the claim loop leases up to `limit` rows beyond its free slots (`ahead`):
    each finishing send starts the next of them at once, so the slots stay full while the
    claims stay large (one claim of ~limit rows instead of many of limit/4: the database's
    cost per row falls with the claim's size). Only while the last claim came back full (a
    backlog: those rows would wait in the table anyway), never for a rate-limited or batching
    channel or with a paused provider; the rows are leased and renewed like rows in flight,
    and handed back on shutdown."""

    name: str
    limit: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    want_more: bool = False
    ahead: deque[Notification] = field(default_factory=deque)  # claimed, waiting for a slot
    backlogged: bool = False  # the last claim came back with every row it asked for

    @property
    def refill(self) -> int:
        """Free slots worth a claim while sends are still running (batching under load)."""
        return max(1, self.limit // 4)

    @property
    def claim_at(self) -> int:
        """Room worth a claim: a quarter of the slots, half of them under a backlog (larger
        claims, the slots kept busy by the rows claimed ahead)."""
        return max(self.refill, self.limit // 2) if self.backlogged else self.refill

    @property
    def ahead_cap(self) -> int:
        """Rows this channel may hold claimed beyond its slots now."""
        return self.limit if self.backlogged else 0

    @property
    def room(self) -> int:
        """Rows a claim could take now: free slots plus free places ahead."""
        return self.limit - self.in_flight + self.ahead_cap - len(self.ahead)


@dataclass
class Health:
    """What /readyz and /status say."""

    listen: bool = True
    started: bool = False
    stopping: bool = False
    db_ok: bool = True
    db_error: str | None = None
    listener: ListenerState | None = None

    def reasons(self) -> list[str]:
        """Why the worker is not ready; empty when it is."""
        reasons = []
        if not self.started:
            reasons.append("starting")
        if self.stopping:
            reasons.append("stopping")
        if not self.db_ok:
            reasons.append(f"database unavailable: {self.db_error}")
        if self.listen and (self.listener is None or not self.listener.connected):
            error = self.listener.last_error if self.listener else None
            reasons.append(f"listener not connected{': ' + error if error else ''}")
        return reasons


@dataclass
class WorkerSettings:
    """The knobs the loop needs (taken from Settings by the service)."""

    lease_seconds: float = 60.0
    poll_interval: float = 5.0
    reap_interval: float = 10.0
    grace_period: float = 25.0
    queue_metrics_interval: float = 15.0
    drain_timeout: float = 10.0
    wake_tokens: bool = False  # hold a channel's wake token while busy (delivery/wakeups.py)
    awake_tick: float = 0.002
    awake_linger: float = 0.05


class Worker:
    """Owns every task of the delivery loop; `run` returns after a graceful stop."""

    def __init__(
        self,
        store: DeliveryStore,
        dispatcher: Dispatcher,
        templates: TemplateStore,
        metrics: DeliveryMetrics,
        health: Health,
        channels: dict[str, int],
        config: WorkerSettings,
        tracing: Tracing | None = None,
        batcher: BatchSender | None = None,
    ) -> None:
        self.store = store
        self.batcher = batcher  # batch requests for broadcasts (delivery/batch.py)
        self.dispatcher = dispatcher
        self.templates = templates
        self.metrics = metrics
        self.health = health
        self.config = config
        self.tracing = tracing or Tracing(enabled=False)
        self.channels = {name: ChannelState(name, limit) for name, limit in channels.items()}
        self.held: dict[int, int] = {}  # claimed, outcome not yet written: id -> attempt
        self.progress = asyncio.Condition()  # notified after every write-back (tests await it)
        self._results: asyncio.Queue[Delivery] = asyncio.Queue()
        self._schedule_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sends: set[asyncio.Task[None]] = set()  # plain tasks: the hot path, cheapest spawn
        self._last_sweep = 0.0
        self._outage = False  # a call found the database unreachable since the last success
        self._renew_now = asyncio.Event()  # heartbeat at once (after an outage)
        self._recovered_at = -float("inf")
        self.wakeups = Wakeups(
            store, enabled=config.wake_tokens, tick=config.awake_tick, linger=config.awake_linger
        )

    # --- wake-ups ------------------------------------------------------------------------------

    def on_wake(self, wake: Wake) -> None:
        """A NOTIFY arrived (called by the listener)."""
        match wake:
            case WakeChannel(channel=name):
                state = self.channels.get(name)
                if state is not None:
                    state.wake.set()
            case WakeScheduled():
                self._schedule_wake.set()
            case TemplatesChanged():
                self.templates.invalidate()
            case Unknown():
                self.wake_all()
            case Ping() | WakeWorkflows():
                pass  # the workflow runner (adapters/workflow_runner.py) hears its own

    def wake_all(self) -> None:
        """Sweep: every channel claims and the scheduler looks again (poll, reconnect)."""
        for state in self.channels.values():
            state.wake.set()
        self._schedule_wake.set()

    def on_listener_connect(self) -> None:
        """After every (re)connect NOTIFYs may have been missed: sweep."""
        self.templates.invalidate()
        self.wake_all()

    def stop(self, *, force: bool = False) -> None:
        """Begin the graceful stop (a second call with force skips the grace period)."""
        self._stop.set()
        if force:
            self._force.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but return at once when stopping."""
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    def _db_failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.db_error(operation)
        if isinstance(exc, StoreUnavailable):
            self.health.db_ok = False
            self._outage = True
        self.health.db_error = str(exc)[:300]
        expected = isinstance(exc, StoreError)
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "%s failed: %s",
            operation,
            self.health.db_error,
            exc_info=not expected,  # a surprise gets its traceback
            extra={"action": f"{operation}_failed"},
        )

    def _db_worked(self) -> None:
        if not self.health.db_ok:
            log.info("database reachable again", extra={"action": "db_recovered"})
        self.health.db_ok = True
        self.health.db_error = None
        if self._outage:
            # Our leases may have run out while the database was away, and another replica's
            # reaper may be about to requeue them: renew them before anything else happens.
            self._outage = False
            self._recovered_at = time.monotonic()
            self._renew_now.set()

    # --- the main loop -----------------------------------------------------------------------

    async def run(self, background: Sequence[Callable[[], Coroutine[Any, Any, Any]]] = ()) -> None:
        """Run until stop(); then stop claiming, finish sends, write back, hand the rest back."""
        async with anyio.create_task_group() as loops:
            loops.start_soon(self._completer_loop)
            loops.start_soon(self._heartbeat_loop)
            loops.start_soon(self._scheduler_loop)
            loops.start_soon(self._reaper_loop)
            loops.start_soon(self._queue_metrics_loop)
            for task in background:
                loops.start_soon(task)
            async with anyio.create_task_group() as claimers:
                for state in self.channels.values():
                    claimers.start_soon(self._claim_loop, state)
                self.health.started = True
                self.wake_all()
                await self._stop.wait()
                self.health.stopping = True
                log.info("stopping: no new claims", extra={"action": "stopping"})
                for state in self.channels.values():
                    state.wake.set()
            await self.wakeups.stop()  # other replicas take over the channels this one watched
            await self._grace()
            with anyio.move_on_after(self.config.drain_timeout):
                await self._results.join()
            await self._release_unfinished()
            loops.cancel_scope.cancel()
        log.info("stopped", extra={"action": "stopped"})

    async def _grace(self) -> None:
        """Wait for in-flight sends up to the grace period, then cut what remains."""
        with anyio.move_on_after(self.config.grace_period):
            async with anyio.create_task_group() as waiters:

                async def idle() -> None:
                    await self._idle.wait()
                    waiters.cancel_scope.cancel()

                async def forced() -> None:
                    await self._force.wait()
                    waiters.cancel_scope.cancel()

                waiters.start_soon(idle)
                waiters.start_soon(forced)
        if not self._idle.is_set():
            running = sum(s.in_flight for s in self.channels.values())
            log.warning(
                "grace period over: cutting %s sends; their rows are handed back",
                running,
                extra={"action": "grace_expired", "count": running},
            )
            for task in self._sends:
                task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)

    async def _release_unfinished(self) -> None:
        for state in self.channels.values():
            state.ahead.clear()  # never started: handed back with the rest of `held`
        if not self.held:
            return
        held = list(self.held.items())
        try:
            released = await self.store.release(held)
        except Exception as exc:  # a loop outlives any failure
            self._db_failed("release", exc)
            log.warning(
                "could not hand back %s claims; they return when their lease expires",
                len(held),
                extra={"action": "release_failed", "count": len(held)},
            )
            return
        for channel, count in released.items():
            self.metrics.released(channel, count)
        total = sum(released.values())
        log.info(
            "handed back %s unfinished claims", total, extra={"action": "released", "count": total}
        )
        self.held.clear()

    # --- claiming and sending ------------------------------------------------------------------

    async def _claim_loop(self, state: ChannelState) -> None:
        backoff = Backoff(0.05, 5.0)
        while True:
            await self.wakeups.wait(state.name, state.wake)  # NOTIFY, poll, slot, or awake tick
            state.wake.clear()
            while not self._stop.is_set():
                self._start_ahead(state)
                free = state.limit - state.in_flight
                if state.in_flight > 0 and state.room < state.claim_at:
                    state.want_more = True  # a finishing send wakes us when enough slots free up
                    break
                take = self.dispatcher.capacity(state.name, free)
                if take == free and state.ahead_cap and self._may_claim_ahead(state):
                    take = state.room  # a backlog: lease beyond the free slots (ChannelState)
                if take == 0:
                    if state.in_flight == 0:
                        # every provider is paused: rows stay queued until a probe may go
                        self._wake_later(state, self.dispatcher.blocked_for(state.name))
                    else:
                        state.want_more = True
                    break
                try:
                    budget = await self.dispatcher.budget(state.name, take)  # shared rate limit
                    if budget.granted == 0:  # no token yet, or every provider paused (a 429)
                        self._wake_later(state, budget.wait)
                        break
                    with self.tracing.claim(state.name) as span:
                        rows = await self.store.claim(
                            state.name, budget.granted, self.config.lease_seconds
                        )
                        self.tracing.annotate(span, rows=len(rows))
                except Exception as exc:  # a loop outlives any failure
                    self._db_failed("claim", exc)
                    await self._sleep(backoff.next())
                    state.wake.set()
                    break
                backoff.reset()
                self._db_worked()
                await self.dispatcher.give_back(budget, rows)
                self.metrics.claimed_rows(state.name, len(rows))
                await self.dispatcher.prepare(rows)
                state.backlogged = len(rows) == budget.granted
                if len(rows) > free:
                    self._start_sends(state, rows[:free])
                    self._hold_ahead(state, rows[free:])
                else:
                    self._start_sends(state, rows)
                await self.wakeups.claimed(state.name, len(rows))  # after the sends started
                if len(rows) < budget.granted or take < free:
                    break  # nothing more is ready, or the circuit allows no more
                if budget.granted < take:  # the rate limit allows no more now: ask again then
                    self._wake_later(state, budget.wait)
                    break
            if self._stop.is_set():
                return

    def _may_claim_ahead(self, state: ChannelState) -> bool:
        """Claiming ahead keeps a backlog's claims large; not where it would change what goes
        out when: a rate limit (tokens are paid at the claim) or a batching provider."""
        if self.batcher is not None and self.batcher.size(state.name) >= 2:
            return False
        return not self.dispatcher.rate_limited(state.name)

    def _hold_ahead(self, state: ChannelState, rows: list[Notification]) -> None:
        """Rows claimed beyond the free slots wait here, leased (renewed, handed back on stop).
        A row of higher priority than the ones already waiting goes before them (the claim
        returns each batch by priority; a stable sort keeps run_at/id order within one)."""
        for n in rows:
            self.held[n.id] = n.attempt
        if state.ahead and rows[0].priority > state.ahead[-1].priority:
            state.ahead = deque(sorted([*state.ahead, *rows], key=lambda n: -n.priority))
        else:
            state.ahead.extend(rows)

    def _start_ahead(self, state: ChannelState) -> None:
        """Start rows claimed ahead in the free slots (not while stopping: they are handed
        back)."""
        while state.ahead and state.in_flight < state.limit and not self._stop.is_set():
            self._start_send(state, state.ahead.popleft())

    def _wake_later(self, state: ChannelState, seconds: float) -> None:
        """Set the channel's wake flag after `seconds` (a paused provider's probe time)."""
        loop = asyncio.get_running_loop()
        loop.call_later(max(seconds, 0.01), state.wake.set)

    def _start_send(self, state: ChannelState, n: Notification) -> None:
        self.held[n.id] = n.attempt
        state.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight_delta(state.name, 1)
        task = asyncio.create_task(self._send(state, n))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _start_sends(self, state: ChannelState, rows: list[Notification]) -> None:
        """A task per row, or per batch request when the channel's provider batches."""
        size = self.batcher.size(state.name) if self.batcher and len(rows) > 1 else 0
        if size < 2:
            for n in rows:
                self._start_send(state, n)
            return
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            for n in chunk:
                self.held[n.id] = n.attempt
            state.in_flight += len(chunk)
            self._idle.clear()
            self.metrics.in_flight_delta(state.name, len(chunk))
            task = asyncio.create_task(self._send_batch(state, chunk))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send_batch(self, state: ChannelState, rows: list[Notification]) -> None:
        assert self.batcher is not None
        try:
            for delivery in await self.batcher.deliver(state.name, rows):
                self._results.put_nowait(delivery)
        except Exception:  # deliver() classifies failures; reaching here is a bug
            log.exception(
                "delivery of a batch of %s crashed; their leases will expire and they are retried",
                len(rows),
                extra={"action": "delivery_crash", "count": len(rows)},
            )
            for n in rows:
                if self.held.get(n.id) == n.attempt:
                    del self.held[n.id]  # stop the heartbeat so the reaper takes them back
        finally:
            self._ended(state, len(rows))

    def _ended(self, state: ChannelState, count: int) -> None:
        """`count` sends of the channel ended: wake its claim loop when slots freed up."""
        state.in_flight -= count
        self.metrics.in_flight_delta(state.name, -count)
        if state.ahead:
            self._start_ahead(state)
        if state.want_more and (state.in_flight == 0 or state.room >= state.claim_at):
            state.want_more = False
            state.wake.set()
        if all(s.in_flight == 0 for s in self.channels.values()):
            self._idle.set()

    async def _send(self, state: ChannelState, n: Notification) -> None:
        try:
            delivery = await self.dispatcher.deliver(n)
            self._results.put_nowait(delivery)
        except Exception:  # deliver() classifies failures; reaching here is a bug
            log.exception(
                "delivery of notification %s crashed; its lease will expire and it is retried",
                n.id,
                extra={"action": "delivery_crash", "notification_id": n.id},
            )
            if self.held.get(n.id) == n.attempt:
                del self.held[n.id]  # stop the heartbeat so the reaper takes it back
        finally:
            self._ended(state, 1)

    # --- write-back ------------------------------------------------------------------------------

    async def _completer_loop(self) -> None:
        while True:
            batch = [await self._results.get()]
            while len(batch) < COMPLETE_BATCH and not self._results.empty():
                batch.append(self._results.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._results.task_done()

    async def _write(self, batch: list[Delivery]) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                written = await self.store.complete([d.completion for d in batch])
                break
            except Exception as exc:  # a loop outlives any failure
                self._db_failed("complete", exc)
                await anyio.sleep(backoff.next())
        self._db_worked()
        self.metrics.written(len(batch))
        retry_scheduled = False
        for d in batch:
            c = d.completion
            if self.held.get(c.id) == c.attempt:
                del self.held[c.id]
            if c.id not in written:
                self.metrics.outcome(d.channel, d.provider, "lost_lease", None)
                log.warning(
                    "outcome of notification %s attempt %s not written: its lease was lost",
                    c.id,
                    c.attempt,
                    extra={"action": "lost_lease", "notification_id": c.id, "attempt": c.attempt},
                )
                continue
            self.metrics.outcome(d.channel, d.provider, d.outcome, d.e2e_seconds)
            retry_scheduled = retry_scheduled or d.outcome in ("retry", "deferred")
        if retry_scheduled:
            self._schedule_wake.set()
        async with self.progress:
            self.progress.notify_all()

    async def _heartbeat_loop(self) -> None:
        interval = self.config.lease_seconds / 3
        while True:
            with anyio.move_on_after(interval):
                await self._renew_now.wait()
            self._renew_now.clear()
            if not self.held:
                continue
            try:
                await self.store.heartbeat(list(self.held.items()), self.config.lease_seconds)
                self._db_worked()
            except Exception as exc:  # a loop outlives any failure
                self._db_failed("heartbeat", exc)

    # --- time: scheduled rows, the fallback poll, expired leases ---------------------------------

    async def _scheduler_loop(self) -> None:
        backoff = Backoff(0.1, 5.0)
        self._last_sweep = time.monotonic()
        while True:
            self._schedule_wake.clear()
            timeout = self.config.poll_interval
            try:
                promoted = await self.store.promote(PROMOTE_BATCH)
                for channel in promoted:
                    if channel in self.channels:
                        self.channels[channel].wake.set()
                if sum(promoted.values()) >= PROMOTE_BATCH:
                    continue  # more came due than one batch holds
                due = await self.store.next_due()
                if due is not None:
                    timeout = min(timeout, max(due, 0.001))
                backoff.reset()
                self._db_worked()
            except Exception as exc:  # a loop outlives any failure
                self._db_failed("promote", exc)
                timeout = min(timeout, backoff.next())
            if time.monotonic() - self._last_sweep >= self.config.poll_interval:
                self._last_sweep = time.monotonic()
                for state in self.channels.values():  # the fallback poll: NOTIFY may be lost
                    state.wake.set()
                timeout = min(timeout, self.config.poll_interval)
            with anyio.move_on_after(timeout):
                await self._schedule_wake.wait()

    async def _reaper_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.reap_interval * (0.75 + random.random() / 2))
            if (
                self._outage
                or time.monotonic() - self._recovered_at < self.config.lease_seconds * 2 / 3
            ):
                # The database was away: every replica renews its leases (a heartbeat goes out at
                # once on recovery) before any replica reaps; two heartbeat intervals of margin,
                # or a live owner's rows would be requeued and sent twice.
                continue
            try:
                reaped = await self.store.reap()
            except Exception as exc:  # a loop outlives any failure
                self._db_failed("reap", exc)
                continue
            for channel, requeued, dead in reaped:
                self.metrics.lease_expired(channel, requeued + dead)
                if channel in self.channels:
                    self.channels[channel].wake.set()
                log.warning(
                    "requeued %s %s rows whose lease expired (%s dead)",
                    requeued,
                    channel,
                    dead,
                    extra={
                        "action": "leases_expired",
                        "channel": channel,
                        "count": requeued + dead,
                    },
                )

    async def _queue_metrics_loop(self) -> None:
        while True:
            try:
                self.metrics.queue(await self.store.queue_status())
                self.metrics.database(await self.store.database_health())
                interval = self.config.queue_metrics_interval  # valid for two refreshes:
                await self.store.channel_health(self.dispatcher.sendable(), 2 * interval)
            except Exception as exc:  # a loop outlives any failure
                self._db_failed("queue_status", exc)
            try:
                self.metrics.workflows(await self.store.workflow_status())
            except Exception as exc:
                self._db_failed("workflow_status", exc)
            await anyio.sleep(self.config.queue_metrics_interval)
