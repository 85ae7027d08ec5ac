"""One delivery through the ports: template -> render -> providers (rate limit, circuit, failover)
-> classify -> resolution."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pgnotify_worker.adapters.db import DB_ERRORS, Completion, QueueStore, TemplateRow
from pgnotify_worker.adapters.providers.registry import ChannelProviders, ProviderSlot
from pgnotify_worker.core.addresses import normalize
from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.core.preferences import Decision, Facts, Send, decide
from pgnotify_worker.core.redact import mask_recipient
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.state import Event, Resolution, Status, decision_resolution, resolve
from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.errors import TemplateError
from pgnotify_worker.models import (
    Notification,
    Outcome,
    Permanent,
    RenderedMessage,
    Retryable,
    Sent,
    Skipped,
)
from pgnotify_worker.ports import Provider
from pgnotify_worker.tracing import Tracing

log = logging.getLogger(__name__)

# Expected decisions are not errors: a retry warns, a hold or deferral is routine.
LOG_LEVEL = {
    Event.RETRY_SCHEDULED: logging.WARNING,
    Event.HELD: logging.DEBUG,
    Event.DEFERRED: logging.DEBUG,
    Event.SKIPPED: logging.INFO,
    Event.EXPIRED: logging.INFO,
}

# The outcome label of pgnotify_notifications_total, by the event an attempt ends with.
OUTCOME_LABEL = {
    Event.SENT: "sent",
    Event.RETRY_SCHEDULED: "retry",
    Event.FAILED: "failed",
    Event.DEAD: "dead",
    Event.SKIPPED: "skipped",
    Event.HELD: "held",
    Event.DEFERRED: "deferred",
    Event.EXPIRED: "expired",
}


def locale_chain(locale: str | None) -> list[str]:
    """fr-CA -> [fr-CA, fr, ''] ; None -> ['']."""
    chain: list[str] = []
    if locale:
        tag = locale.replace("_", "-")
        chain.append(tag)
        if locale != tag:
            chain.append(locale)
        language = tag.split("-", 1)[0]
        if language not in chain:
            chain.append(language)
    chain.append("")
    return chain


class TemplateStore:
    """Stored templates with a short cache, dropped at once when pgnotify.templates changes."""

    def __init__(
        self, store: QueueStore, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, TemplateRow | None]] = {}

    def invalidate(self) -> None:
        """Forget everything (NOTIFY 'templates' arrived)."""
        self._cache.clear()

    async def get(self, key: str, channel: str, locale: str | None) -> TemplateRow | None:
        """The best template row for key/channel/locale, or None when none exists."""
        cache_key = (key, channel, locale or "")
        hit = self._cache.get(cache_key)
        now = self.clock()
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self.store.template(key, channel, locale_chain(locale))
        self._cache[cache_key] = (now + self.ttl, row)
        return row


@dataclass(frozen=True, slots=True)
class Delivery:
    """A finished attempt: what to write back, and what to measure once it is written."""

    completion: Completion
    channel: str
    outcome: str  # sent, retry, failed, dead, skipped
    provider: str
    e2e_seconds: float | None  # insert -> accepted, on the database clock plus the send time


class Dispatcher:
    """Delivers one claimed notification and decides its next state. Never raises for a failure."""

    def __init__(
        self,
        channels: dict[str, ChannelProviders],
        templates: TemplateStore,
        renderer: Renderer,
        policy: RetryPolicy,
        *,
        store: QueueStore | None = None,
        observe_send: Callable[[str, str, float], None] = lambda _c, _p, _s: None,
        on_circuit: Callable[[str, CircuitBreaker], None] = lambda _p, _b: None,
        on_failover: Callable[[str, str], None] = lambda _c, _p: None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sms_region: str = "US",
        unsubscribe_url: Callable[[str, str | None], str] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.channels = channels
        self.templates = templates
        self.renderer = renderer
        self.policy = policy
        self.store = store
        self.observe_send = observe_send
        self.on_circuit = on_circuit
        self.on_failover = on_failover
        self.rand = rand
        self.clock = clock
        self.sms_region = sms_region
        self.unsubscribe_url = unsubscribe_url
        self.tracing = tracing or Tracing(enabled=False)
        self._facts: dict[int, Any] = {}  # prefetched per claim batch, consumed by deliver()

    # --- circuits: what the claim loop may take -------------------------------------------------

    def capacity(self, channel: str, free: int) -> int:
        """Rows to claim: every free slot while a provider's circuit is closed, one probe while
        the best is half-open, none while all are open (nothing is burned on a dead service)."""
        slots = self.channels[channel].slots
        if any(slot.breaker.state is CircuitState.CLOSED for slot in slots):
            return free
        now = self.clock()
        return min(free, 1) if any(slot.breaker.allows(now) for slot in slots) else 0

    def blocked_for(self, channel: str) -> float:
        """Seconds until some provider of the channel may be tried again."""
        now = self.clock()
        return min((slot.breaker.opens_in(now) for slot in self.channels[channel].slots), default=0)

    # --- send-time rules: preferences, consent, suppression, quiet hours, expiry ------------------

    @staticmethod
    def needs_facts(n: Notification) -> bool:
        """Rows about a user or a category, and email/SMS addresses (suppressions), are checked."""
        return n.user_id is not None or n.category is not None or n.channel in ("email", "sms")

    async def prepare(self, rows: list[Notification]) -> None:
        """Fetch the facts of a claimed batch in one round trip (deliver() falls back per row)."""
        wanted = [n for n in rows if self.needs_facts(n)]
        if not wanted or self.store is None:
            return
        with contextlib.suppress(*DB_ERRORS):  # on failure each row asks again by itself
            self._facts.update(
                await self.store.send_facts(
                    [n.id for n in wanted],
                    [normalize(n.channel, n.recipient, self.sms_region) for n in wanted],
                )
            )

    async def decision(self, n: Notification) -> Decision:
        """Send, skip, expire, hold or defer."""
        expired = n.expires_at is not None and n.expires_at <= n.claimed_at
        if expired or not self.needs_facts(n) or self.store is None:
            return decide(Facts(expired=expired, is_digest=n.digest_of is not None))
        row = self._facts.pop(n.id, None)
        if row is None:
            address = normalize(n.channel, n.recipient, self.sms_region)
            row = (await self.store.send_facts([n.id], [address])).get(n.id)
        if row is None:
            return Send()
        return decide(
            Facts(
                suppressed=row["suppressed"],
                critical=row["critical"],
                unsubscribed=row["unsubscribed"],
                requires_consent=row["requires_consent"],
                consent=row["consent"],
                preference=row["preference"],
                is_digest=n.digest_of is not None,
                quiet_start=row["quiet_start"],
                quiet_end=row["quiet_end"],
                local_time=row["local_time"],
            )
        )

    # --- rendering ------------------------------------------------------------------------------

    async def render(
        self, n: Notification, critical: bool = False
    ) -> tuple[RenderedMessage, int | None]:
        """Apply the stored template (newest version, best locale) and inline overrides."""
        parts = TemplateParts(subject=n.subject, body=n.body, html_body=n.html_body)
        version = None
        if n.template is not None:
            row = await self.templates.get(n.template, n.channel, n.locale)
            if row is None:
                raise TemplateError(
                    "template_missing",
                    f"template {n.template!r} for channel {n.channel} does not exist",
                )
            version = row.version
            parts = TemplateParts(
                subject=n.subject if n.subject is not None else row.subject,
                body=n.body if n.body is not None else row.body,
                html_body=n.html_body if n.html_body is not None else row.html_body,
                key=row.key,
                version=row.version,
            )
        unsubscribe = n.payload.get("unsubscribe_url")
        if not isinstance(unsubscribe, str) and self.unsubscribe_url and n.user_id is not None:
            unsubscribe = self.unsubscribe_url(n.user_id, n.category)
        if critical and isinstance(unsubscribe, str):  # no opt-out: empty link, no header
            unsubscribe = ""  # (not undefined: a template that prints it must still render)
        extra = {"unsubscribe_url": unsubscribe} if isinstance(unsubscribe, str) else None
        layouts = await self._layouts(parts, n.channel, n.locale)
        rendered = self.renderer.render(parts, build_context(n.payload, extra), layouts)
        message = RenderedMessage(
            notification_id=n.id,
            idempotency_key=n.idempotency_key,
            channel=n.channel,
            recipient=n.recipient,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            data=n.payload,
            user_id=n.user_id,
            category=n.category,
            template=n.template,
            template_version=version,
            attempt=n.attempt,
            created_at=n.created_at,
            unsubscribe_url=unsubscribe if isinstance(unsubscribe, str) else None,
        )
        return message, version

    async def _layouts(
        self, parts: TemplateParts, channel: str, locale: str | None
    ) -> dict[tuple[str, bool], str]:
        """The stored templates a body or HTML body extends or includes, and theirs in turn."""
        found: dict[tuple[str, bool], str] = {}
        todo = [(source, html) for source, html in ((parts.body, False), (parts.html_body, True))]
        for _ in range(5):  # layouts of layouts, a few levels deep
            wanted = {
                (name, html)
                for source, html in todo
                if source
                for name in self.renderer.references(source, html=html)
                if (name, html) not in found
            }
            if not wanted:
                break
            todo = []
            for name, html in wanted:
                row = await self.templates.get(name, channel, locale)
                source = (row.html_body if html else row.body) if row else None
                if source is not None:
                    found[(name, html)] = source
                    todo.append((source, html))
        return found

    # --- sending --------------------------------------------------------------------------------

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

    def _record(self, slot: ProviderSlot, outcome: Outcome, before: CircuitState) -> None:
        """Feed the provider's circuit: an answer closes it, a run of failures opens it."""
        breaker = slot.breaker
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

    async def send_chain(self, channel: str, message: RenderedMessage) -> tuple[Outcome, str]:
        """Try the channel's providers in order: a retryable failure or an open circuit moves on
        to the next; the first answer that is not retryable (or the last failure) wins."""
        last: tuple[Outcome, str] | None = None
        moved_on = False
        for slot in self.channels[channel].slots:
            handles = getattr(slot.provider, "handles", None)  # an address this provider can use?
            if handles is not None and not handles(message.recipient):
                continue
            before = slot.breaker.state
            if not slot.breaker.acquire(self.clock()):
                moved_on = True  # paused: the next provider takes it
                continue
            if slot.breaker.state is not before:
                self.on_circuit(slot.name, slot.breaker)  # open -> half-open: this is the probe
                before = slot.breaker.state
            outcome: Outcome | None = None
            try:
                if slot.bucket is not None:
                    wait = slot.bucket.reserve(self.clock())
                    if wait > 0:
                        await asyncio.sleep(wait)
                outcome = await self._call(slot.provider, message)
            finally:
                if outcome is None:  # cancelled before an answer: free the half-open probe
                    slot.breaker.release()
            self._record(slot, outcome, before)
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
        reasons = "; ".join(f"{slot.name}: {slot.breaker.reason}" for slot in slots)
        return (
            Retryable(
                "circuit_open",
                f"every {channel} provider is paused ({reasons})",
                self.blocked_for(channel) or None,
            ),
            "none",
        )

    async def _fan_out(self, n: Notification, message: RenderedMessage) -> tuple[Outcome, str]:
        """A push to a user goes to each active device; it is sent when one device accepted it."""
        assert self.store is not None
        devices = await self.store.devices_of(message.recipient.removeprefix("user:"))
        if not devices:
            return Skipped("no_devices", "the user has no active push device"), "none"
        outcomes = await asyncio.gather(
            *(self.send_chain("push", replace(message, recipient=token)) for _, _, token in devices)
        )
        for (device_id, platform, token), (outcome, provider) in zip(
            devices, outcomes, strict=True
        ):
            await self._after_send(n, "push", token, outcome, provider)
            await self.store.note(
                n.id,
                f"device_{type(outcome).__name__.lower()}",
                n.attempt,
                provider=provider,
                error_code=getattr(outcome, "code", None),
                error=getattr(outcome, "message", None),
                detail={"device_id": device_id, "platform": platform},
            )
        sent = [(outcome, provider) for outcome, provider in outcomes if isinstance(outcome, Sent)]
        if sent:
            ids = ",".join(outcome.provider_message_id or "" for outcome, _ in sent)[:500]
            return Sent(ids), sent[0][1]
        retry = [pair for pair in outcomes if isinstance(pair[0], Retryable)]
        if retry:
            return retry[0]
        return Permanent("no_device_accepted", f"all {len(devices)} device(s) refused"), outcomes[
            0
        ][1]

    async def _after_send(
        self, n: Notification, channel: str, address: str, outcome: Outcome, provider: str
    ) -> None:
        """Dead addresses are remembered: suppressed (STOP, hard bounce) or deactivated (push)."""
        if not isinstance(outcome, Permanent) or self.store is None:
            return
        try:
            if outcome.deactivate:
                await self.store.deactivate_device(address, outcome.code)
            if outcome.suppress and channel != "push":
                normalized = normalize(channel, address, self.sms_region)
                detail = {"notification_id": n.id, "code": outcome.code}
                await self.store.suppress(channel, normalized, outcome.suppress, provider, detail)
        except DB_ERRORS as exc:
            log.warning(
                "could not record that %s is dead: %s",
                mask_recipient(channel, address),
                type(exc).__name__,
                extra={"action": "suppress_failed", "notification_id": n.id},
            )

    async def deliver(self, n: Notification) -> Delivery:
        """Render, send, classify; the result is ready for the batched write-back."""
        with self.tracing.send(n) as span:
            delivery = await self._deliver(n)
            self.tracing.annotate(span, outcome=delivery.outcome, provider=delivery.provider)
        return delivery

    async def _deliver(self, n: Notification) -> Delivery:
        started = time.perf_counter()
        try:
            verdict = await self.decision(n)
        except DB_ERRORS:
            unavailable = Retryable("database", "preference lookup failed: database unavailable")
            resolution = resolve(unavailable, n.attempt, n.max_attempts, self.policy, self.rand())
            return self._delivery(n, resolution, "none", started, None, None)
        early = decision_resolution(verdict)
        if early is not None:
            self._log(n, early, "none", time.perf_counter() - started)
            return self._delivery(n, early, "none", started, None, None)
        provider_name = "none"
        version = None
        outcome: Outcome
        try:
            message, version = await self.render(n, isinstance(verdict, Send) and verdict.critical)
        except TemplateError as exc:
            outcome = Permanent(exc.code, exc.message)
        except DB_ERRORS:
            outcome = Retryable("database", "template lookup failed: database unavailable")
        else:
            if n.channel == "push" and n.recipient.startswith("user:") and self.store is not None:
                try:
                    outcome, provider_name = await self._fan_out(n, message)
                except DB_ERRORS:
                    outcome = Retryable("database", "device lookup failed: database unavailable")
            else:
                outcome, provider_name = await self.send_chain(n.channel, message)
                await self._after_send(n, n.channel, n.recipient, outcome, provider_name)
        elapsed = time.perf_counter() - started
        self.observe_send(n.channel, provider_name, elapsed)
        resolution = resolve(outcome, n.attempt, n.max_attempts, self.policy, self.rand())
        self._log(n, resolution, provider_name, elapsed)
        return self._delivery(n, resolution, provider_name, started, version, outcome)

    def _delivery(
        self,
        n: Notification,
        resolution: Resolution,
        provider_name: str,
        started: float,
        version: int | None,
        outcome: Outcome | None,
    ) -> Delivery:
        elapsed = time.perf_counter() - started
        e2e = None
        if isinstance(outcome, Sent):
            e2e = max(0.0, (n.claimed_at - n.created_at).total_seconds()) + elapsed
        return Delivery(
            completion=Completion(
                id=n.id,
                attempt=n.attempt,
                status=resolution.status.value,
                event=resolution.event.value,
                delay=resolution.delay,
                error_code=resolution.error_code,
                error=resolution.error,
                provider=None if provider_name == "none" else provider_name,
                provider_message_id=resolution.provider_message_id,
                duration_ms=elapsed * 1000,
                template_version=version,
                refund=1 if resolution.refund else 0,
                hold=resolution.hold,
            ),
            channel=n.channel,
            outcome=OUTCOME_LABEL[resolution.event],
            provider=provider_name,
            e2e_seconds=e2e,
        )

    @staticmethod
    def _log(n: Notification, resolution: Resolution, provider: str, elapsed: float) -> None:
        if resolution.status is Status.SENT:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "sent notification %s",
                    n.id,
                    extra={
                        "action": "sent",
                        "notification_id": n.id,
                        "channel": n.channel,
                        "provider": provider,
                        "attempt": n.attempt,
                        "recipient": mask_recipient(n.channel, n.recipient),
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            return
        level = LOG_LEVEL.get(resolution.event, logging.ERROR)
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "notification %s attempt %s: %s -> %s",
            n.id,
            n.attempt,
            resolution.error or resolution.event.value,
            resolution.status.value,
            extra={
                "action": resolution.event.value,
                "notification_id": n.id,
                "channel": n.channel,
                "provider": provider,
                "attempt": n.attempt,
                "error_code": resolution.error_code,
                "recipient": mask_recipient(n.channel, n.recipient),
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
