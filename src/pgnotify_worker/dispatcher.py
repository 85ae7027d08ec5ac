"""One delivery through the ports: template -> render -> provider -> classify -> resolution."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pgnotify_worker.adapters.db import DB_ERRORS, Completion, QueueStore, TemplateRow
from pgnotify_worker.adapters.providers.registry import ChannelProviders
from pgnotify_worker.core.redact import mask_recipient
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.state import Resolution, Status, resolve
from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.errors import TemplateError
from pgnotify_worker.models import (
    Notification,
    Outcome,
    Permanent,
    RenderedMessage,
    Retryable,
    Sent,
)
from pgnotify_worker.ports import Provider

log = logging.getLogger(__name__)

OUTCOME_LABEL = {
    Status.SENT: "sent",
    Status.SCHEDULED: "retry",
    Status.FAILED: "failed",
    Status.DEAD: "dead",
    Status.SKIPPED: "skipped",
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
    outcome: str  # sent, retry, failed, dead
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
        observe_send: Callable[[str, str, float], None] = lambda _c, _p, _s: None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.channels = channels
        self.templates = templates
        self.renderer = renderer
        self.policy = policy
        self.observe_send = observe_send
        self.rand = rand

    async def render(self, n: Notification) -> tuple[RenderedMessage, int | None]:
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
        rendered = self.renderer.render(parts, build_context(n.payload))
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
        )
        return message, version

    async def _send(
        self, providers: Sequence[Provider], message: RenderedMessage
    ) -> tuple[Outcome, str]:
        provider = providers[0]
        name = provider.name
        try:
            outcome = await provider.send(message)
        except Exception:  # a provider bug must not kill the worker; the attempt is retried
            log.exception(
                "provider %s raised while sending notification %s",
                name,
                message.notification_id,
                extra={"action": "provider_crash", "notification_id": message.notification_id},
            )
            outcome = Retryable("provider_crash", f"provider {name} raised an unexpected error")
        return outcome, name

    async def deliver(self, n: Notification) -> Delivery:
        """Render, send, classify; the result is ready for the batched write-back."""
        started = time.perf_counter()
        provider_name = "none"
        version = None
        outcome: Outcome
        try:
            message, version = await self.render(n)
        except TemplateError as exc:
            outcome = Permanent(exc.code, exc.message)
        except DB_ERRORS:
            outcome = Retryable("database", "template lookup failed: database unavailable")
        else:
            outcome, provider_name = await self._send(self.channels[n.channel].providers, message)
        elapsed = time.perf_counter() - started
        self.observe_send(n.channel, provider_name, elapsed)
        resolution = resolve(outcome, n.attempt, n.max_attempts, self.policy, self.rand())
        self._log(n, resolution, provider_name, elapsed)
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
            ),
            channel=n.channel,
            outcome=OUTCOME_LABEL[resolution.status],
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
        level = logging.WARNING if resolution.status is Status.SCHEDULED else logging.ERROR
        log.log(
            level,
            "notification %s attempt %s: %s -> %s",
            n.id,
            n.attempt,
            resolution.error,
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
