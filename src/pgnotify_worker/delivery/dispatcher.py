"""One delivery through the ports: decide (preferences, expiry) -> render -> send (failover)
-> classify -> the resolution the worker writes back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pgnotify_worker.core.addresses import normalize
from pgnotify_worker.core.preferences import Decision, Facts, Send, decide
from pgnotify_worker.core.redact import mask_recipient
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.state import Event, Resolution, Status, decision_resolution, resolve
from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.core.throttle import verdict as throttle_verdict
from pgnotify_worker.delivery.failover import ChannelProviders, Failover
from pgnotify_worker.delivery.limits import Budget
from pgnotify_worker.delivery.templates import TemplateStore
from pgnotify_worker.errors import StoreError, TemplateError
from pgnotify_worker.models import (
    Completion,
    Notification,
    Outcome,
    Permanent,
    RenderedMessage,
    Retryable,
    Sent,
    Skipped,
)
from pgnotify_worker.ports import DeliveryStore
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

# A row that waits for its destination (paused after failures, or at its in-flight cap) is
# routine, not a warning per row.
WAITING = frozenset({"destination_busy", "destination_paused"})

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


SEND = Send()  # the decision for a row with no user, category or address rules (decide(Facts()))


def _blank(value: str | None) -> bool:
    return value is None or not value.strip()


def empty_body(message: RenderedMessage) -> str | None:
    """Why a rendered message would go out with nothing in it (a template that renders to
    whitespace), or None. Push and in-app may carry data only; what was written must not be
    blank."""
    match message.channel:
        case "email" if _blank(message.text) and _blank(message.html):
            return "the email rendered with an empty body: nothing was sent"
        case "sms" if _blank(message.text):
            return "the SMS rendered with an empty body: nothing was sent"
        case "webhook" | "push" | "inapp" if (
            message.text is not None and _blank(message.text) and _blank(message.subject)
        ):
            return f"the {message.channel} body rendered empty: nothing was sent"
    return None


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
        failover: Failover,
        templates: TemplateStore,
        renderer: Renderer,
        policy: RetryPolicy,
        *,
        store: DeliveryStore | None = None,
        observe_send: Callable[[str, str, float], None] = lambda _c, _p, _s: None,
        rand: Callable[[], float] = random.random,
        sms_region: str = "US",
        unsubscribe_url: Callable[[str, str | None], str] | None = None,
        preferences_url: Callable[[str], str] | None = None,
        tracing: Tracing | None = None,
        on_throttled: Callable[[str, str], None] = lambda _channel, _action: None,
    ) -> None:
        self.failover = failover
        self.on_throttled = on_throttled  # (channel, action): a send over its throttle
        self.templates = templates
        self.renderer = renderer
        self.policy = policy
        self.store = store
        self.observe_send = observe_send
        self.rand = rand
        self.sms_region = sms_region
        self.unsubscribe_url = unsubscribe_url
        self.preferences_url = preferences_url
        self.tracing = tracing or Tracing(enabled=False)
        self._facts: dict[int, Any] = {}  # prefetched per claim batch, consumed by deliver()

    @property
    def channels(self) -> dict[str, ChannelProviders]:
        """The providers of each channel."""
        return self.failover.channels

    def capacity(self, channel: str, free: int) -> int:
        """Rows the claim loop may take (see Failover.capacity)."""
        return self.failover.capacity(channel, free)

    def blocked_for(self, channel: str) -> float:
        """Seconds until some provider of the channel may be tried again."""
        return self.failover.blocked_for(channel)

    def rate_limited(self, channel: str) -> bool:
        """Does a shared rate limit apply to a provider of the channel (Failover.rate_limited)?"""
        return self.failover.rate_limited(channel)

    def sendable(self) -> dict[str, bool]:
        """Per channel: can this worker send it now (a usable provider, not every one paused)?"""
        return {
            name: entry.disabled_reason is None and self.capacity(name, 1) > 0
            for name, entry in self.channels.items()
        }

    async def budget(self, channel: str, wanted: int) -> Budget:
        """Tokens of the channel's provider's shared rate limit for a claim (Failover.budget)."""
        return await self.failover.budget(channel, wanted)

    async def give_back(self, budget: Budget, claimed: list[Notification]) -> None:
        """Claimed rows keep their tokens; the unused ones go back (Failover.give_back)."""
        await self.failover.give_back(budget, claimed)

    async def send_chain(self, channel: str, message: RenderedMessage) -> tuple[Outcome, str]:
        """Send through the channel's providers in failover order."""
        return await self.failover.send_chain(channel, message)

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
        with contextlib.suppress(StoreError):  # on failure each row asks again by itself
            self._facts.update(
                await self.store.send_facts(
                    [n.id for n in wanted],
                    [normalize(n.channel, n.recipient, self.sms_region) for n in wanted],
                )
            )

    async def decision(self, n: Notification) -> Decision:
        """Send, skip, expire, hold or defer; a send over its category's throttle is dropped,
        delayed or folded into a batch."""
        expired = n.expires_at is not None and n.expires_at <= n.claimed_at
        if expired or not self.needs_facts(n) or self.store is None:
            if not expired:
                return SEND  # no facts to weigh: what decide() says for a row without any
            return decide(Facts(expired=expired, is_digest=n.digest_of is not None))
        row = self._facts.pop(n.id, None)
        if row is None:
            address = normalize(n.channel, n.recipient, self.sms_region)
            row = (await self.store.send_facts([n.id], [address])).get(n.id)
        if row is None:
            return Send()
        verdict = decide(
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
        if (
            isinstance(verdict, Send)
            and row["throttled"]
            and n.category is not None
            and n.digest_of is None
        ):
            # last, so only a row that would go out now counts against the allowance (a digest
            # already gathers many: it is not throttled)
            take = await self.store.take_throttle(n.user_id or n.recipient, n.category, n.channel)
            if take is not None and not take.allowed:
                self.on_throttled(n.channel, take.action)
            return throttle_verdict(take)
        return verdict

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
        if self.preferences_url and n.user_id is not None and "preferences_url" not in n.payload:
            extra = {**(extra or {}), "preferences_url": self.preferences_url(n.user_id)}
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
        if parts.body is None and parts.html_body is None:
            return found  # nothing rendered from a template: nothing it could extend
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
        except StoreError as exc:
            log.warning(
                "could not record that %s is dead: %s",
                mask_recipient(channel, address),
                type(exc).__name__,
                extra={"action": "suppress_failed", "notification_id": n.id},
            )

    async def deliver(self, n: Notification) -> Delivery:
        """Render, send, classify; the result is ready for the batched write-back."""
        if not self.tracing.active:  # the hot path without a span's context managers
            try:
                return await self._deliver(n)
            finally:
                self.failover.settled(n.id)
        try:
            with self.tracing.send(n) as span:
                delivery = await self._deliver(n)
                self.tracing.annotate(span, outcome=delivery.outcome, provider=delivery.provider)
        finally:
            self.failover.settled(n.id)
        return delivery

    async def compose(
        self, n: Notification, started: float
    ) -> tuple[RenderedMessage, int | None] | Delivery:
        """Decide and render one row: the message to send with its template version, or the
        row's Delivery when it is not to be sent (preferences, expiry, a template error, the
        database unavailable). The single-row and the batch paths both start here."""
        try:
            verdict = await self.decision(n)
        except StoreError:
            unavailable = Retryable(
                "database", "preference lookup failed: database unavailable", tried=False
            )
            resolution = resolve(unavailable, n.attempt, n.max_attempts, self.policy, self.rand())
            return self._delivery(n, resolution, "none", started, None, None)
        early = decision_resolution(verdict)
        if early is not None:
            self._log(n, early, "none", time.perf_counter() - started)
            return self._delivery(n, early, "none", started, None, None)
        outcome: Outcome
        try:
            message, version = await self.render(n, isinstance(verdict, Send) and verdict.critical)
            empty = empty_body(message)
            if empty is not None:
                raise TemplateError("empty_body", empty)
        except TemplateError as exc:
            outcome = Permanent(exc.code, exc.message)
        except StoreError:
            outcome = Retryable(
                "database", "template lookup failed: database unavailable", tried=False
            )
        else:
            return message, version
        return self.resolved(n, outcome, "none", started, None)

    def resolved(
        self, n: Notification, outcome: Outcome, provider: str, started: float, version: int | None
    ) -> Delivery:
        """The row's Delivery for a send's outcome (observed, resolved, logged)."""
        elapsed = time.perf_counter() - started
        self.observe_send(n.channel, provider, elapsed)
        resolution = resolve(outcome, n.attempt, n.max_attempts, self.policy, self.rand())
        self._log(n, resolution, provider, elapsed)
        return self._delivery(n, resolution, provider, started, version, outcome)

    async def _deliver(self, n: Notification) -> Delivery:
        started = time.perf_counter()
        prepared = await self.compose(n, started)
        if isinstance(prepared, Delivery):
            return prepared
        message, version = prepared
        provider_name = "none"
        outcome: Outcome
        if n.channel == "push" and n.recipient.startswith("user:") and self.store is not None:
            try:
                outcome, provider_name = await self._fan_out(n, message)
            except StoreError:
                outcome = Retryable(
                    "database", "device lookup failed: database unavailable", tried=False
                )
        else:
            outcome, provider_name = await self.send_chain(n.channel, message)
            await self._after_send(n, n.channel, n.recipient, outcome, provider_name)
        return self.resolved(n, outcome, provider_name, started, version)

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
                claimed_at=n.claimed_at,
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
        if resolution.error_code in WAITING:
            level = logging.DEBUG  # routine: the destination's own pause is logged once
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
