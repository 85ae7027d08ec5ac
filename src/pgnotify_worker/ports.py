"""The seams: what delivery needs from providers, from storage and from metrics. Adapters
implement them; the delivery package sees nothing else (checked by import-linter)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

from pgnotify_worker.core.throttle import Take
from pgnotify_worker.models import (
    Completion,
    Notification,
    Outcome,
    RenderedMessage,
    TemplateRow,
    TokenGrant,
)


@runtime_checkable
class Provider(Protocol):
    """Sends one rendered message and classifies the answer. Never raises for a failed send."""

    name: str

    async def start(self) -> None:
        """Open sessions; raise ProviderConfigError when it cannot work."""

    async def close(self) -> None:
        """Release sessions and files."""

    async def send(self, message: RenderedMessage) -> Outcome:
        """Deliver; Sent, Retryable or Permanent."""
        ...


@runtime_checkable
class BatchProvider(Protocol):
    """Optional on a Provider whose API takes many messages in one request (Resend's batch
    endpoint, SendGrid personalizations, the in-app inbox). delivery.batch groups claimed rows by
    `batch_key` and sends each group with one `send_batch` call."""

    name: str
    batch_limit: int  # the most messages the API takes in one request

    def batch_key(self, message: RenderedMessage) -> Hashable:
        """Messages with equal keys may share one request (same sender, same content...)."""
        ...

    async def send_batch(self, messages: Sequence[RenderedMessage]) -> Sequence[Outcome] | Outcome:
        """Deliver them in one request; never raises. One outcome per message, in order, when the
        provider answered per message (a partly rejected batch); a single Outcome when the
        request failed as a whole (5xx, timeout, 429): nothing of it was accepted, or (5xx,
        timeout) it is unknown what was, and a retry must be the same request."""
        ...


class Destined(Protocol):
    """Optional on a Provider that sends to many independent hosts (webhooks, Web Push): the
    destination a recipient is sent to (its origin, scheme://host:port), or None when the
    recipient is unusable (send() says why). Breakers, concurrency caps and disabling are then
    kept per destination; a provider without it (one API: Resend, Twilio, FCM) is one
    destination."""

    def destination(self, recipient: str) -> str | None:
        """scheme://host:port, or None."""
        ...


class DeliveryStore(Protocol):
    """What delivery needs from storage (adapters.db.QueueStore). Every method raises
    errors.StoreError (StoreUnavailable when the database is unreachable), never a driver error."""

    worker_id: str

    async def claim(self, channel: str, limit: int, lease_seconds: float) -> list[Notification]:
        """Lease up to `limit` ready rows of a channel."""
        ...

    async def complete(self, batch: Sequence[Completion]) -> set[int]:
        """Write outcomes, fenced by lease and attempt; the ids written."""
        ...

    async def heartbeat(self, held: Sequence[tuple[int, int]], lease_seconds: float) -> int:
        """Extend the leases of (id, attempt) pairs still held."""
        ...

    async def release(self, held: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Hand claims back; counts per channel."""
        ...

    async def reap(self, limit: int = 1000) -> list[tuple[str, int, int]]:
        """Requeue expired leases: (channel, requeued, dead)."""
        ...

    async def promote(self, limit: int = 1000) -> dict[str, int]:
        """Make due scheduled rows ready; counts per channel."""
        ...

    async def next_due(self) -> float | None:
        """Seconds to the next scheduled row."""
        ...

    async def queue_status(self) -> list[dict[str, Any]]:
        """Per-channel counts of the queue_status view."""
        ...

    async def workflow_status(self) -> dict[str, Any]:
        """Running workflow runs by state, the oldest overdue one's age, open batching windows."""
        ...

    async def wake_token(self, channel: str, hold: bool) -> bool:
        """Take (hold) or give back the channel's wake token; whether this worker now holds it.
        While a worker holds it, producers' INSERTs skip the NOTIFY (schema 0008)."""
        ...

    async def wake_handover_done(self, channel: str) -> bool:
        """Whether every transaction that inserted into the channel while the token was held has
        ended (so one more claim sees all their rows)."""
        ...

    async def wake_others(self, channel: str) -> None:
        """NOTIFY the channel: other replicas claim (this one stops and gave its token back)."""
        ...

    async def database_health(self) -> dict[str, Any]:
        """Oldest open transaction and dead rows of the queue tables."""
        ...

    async def channel_health(self, sendable: dict[str, bool], valid_for: float) -> None:
        """Record per channel whether this worker can send it now, valid for `valid_for` s."""
        ...

    async def template(self, key: str, channel: str, locales: Sequence[str]) -> TemplateRow | None:
        """The newest version of a template in the best available locale."""
        ...

    async def send_facts(self, ids: Sequence[int], addresses: Sequence[str]) -> dict[int, Any]:
        """Facts for the preference rules, per notification id."""
        ...

    async def take_throttle(self, subject: str, category: str, channel: str) -> Take | None:
        """Count one send against the category's throttle; None when it has none."""
        ...

    async def devices_of(self, user_id: str) -> list[tuple[int, str, str]]:
        """(id, platform, token) of a user's active push devices."""
        ...

    async def deactivate_device(self, token: str, reason: str) -> bool:
        """Mark a push token dead."""
        ...

    async def suppress(
        self, channel: str, address: str, reason: str, source: str, detail: dict[str, Any] | None
    ) -> None:
        """Add an address to the suppression list."""
        ...

    async def note(
        self,
        notification_id: int,
        event: str,
        attempt: int,
        *,
        provider: str | None = None,
        error_code: str | None = None,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """An extra event row (per-device push outcomes and the like)."""
        ...

    async def destinations(self) -> list[tuple[str, bool, str | None]]:
        """(origin, disabled, reason) of every destination recorded as failing or disabled."""
        ...

    async def destination_failing(
        self, origin: str, error: str, disable_after: float
    ) -> tuple[bool, float]:
        """A destination's circuit opened: record it failing (since the first time); disable it
        when failing for `disable_after` seconds. (disabled just now, seconds failing)."""
        ...

    async def destination_recovered(self, origin: str) -> None:
        """A failing (not disabled) destination answered again: forget its failures."""
        ...


class RateLimitStore(Protocol):
    """Providers' rate limits shared by all replicas (adapters.db.QueueStore, schema 0007).
    Raises errors.StoreError like DeliveryStore."""

    async def take_tokens(
        self, provider: str, wanted: int, limit: tuple[float, float], reserve: bool = False
    ) -> TokenGrant:
        """Take up to `wanted` tokens now (or, with `reserve`, ahead of time); `limit` is the
        (rate, burst) that recreates the provider's bucket if the database lost it."""
        ...

    async def give_back_tokens(self, provider: str, count: int) -> None:
        """Return granted tokens that were not used."""
        ...

    async def pause_provider(self, provider: str, seconds: float, reason: str) -> float | None:
        """Pause a provider for every replica; seconds until the pause ends."""
        ...


class DeliveryMetrics(Protocol):
    """What the delivery loop reports (adapters.metrics.Metrics)."""

    def db_error(self, operation: str) -> None:
        """A database call of the loop failed."""

    def claimed_rows(self, channel: str, count: int) -> None:
        """One claim returned `count` rows."""

    def in_flight_delta(self, channel: str, delta: int) -> None:
        """A send started (+1) or ended (-1)."""

    def written(self, size: int) -> None:
        """One batched write-back."""

    def outcome(self, channel: str, provider: str, outcome: str, e2e: float | None) -> None:
        """An attempt's outcome."""

    def released(self, channel: str, count: int) -> None:
        """Unfinished claims handed back."""

    def lease_expired(self, channel: str, count: int) -> None:
        """Rows requeued by the reaper."""

    def queue(self, rows: list[dict[str, Any]]) -> None:
        """Queue gauges from the queue_status view."""

    def database(self, health: dict[str, Any]) -> None:
        """Gauges of the oldest transaction and the queue tables' dead rows."""

    def workflows(self, status: dict[str, Any]) -> None:
        """Gauges of the workflow runs and batching windows (workflow_status)."""


class WorkflowMetrics(Protocol):
    """What the workflow runner reports (adapters.metrics.Metrics), once its transaction
    committed."""

    def workflow_run_started(self) -> None:
        """A run's first evaluation."""

    def workflow_run_finished(self, outcome: str) -> None:
        """A run ended: completed, stopped, cancelled or failed."""

    def workflow_step(self, kind: str, outcome: str) -> None:
        """A step recorded."""


class InboxMetrics(Protocol):
    """What the inbox feed reports (adapters.metrics.Metrics)."""

    def inbox_stream_opened(self) -> None:
        """A stream answered 200 and started."""

    def inbox_stream_closed(self, reason: str) -> None:
        """An opened stream ended: client_closed, token_expired, user_limit, server_stopping,
        slow_client."""

    def inbox_stream_refused(self, reason: str) -> None:
        """A stream request was refused: process_limit, unavailable, server_stopping."""

    def inbox_messages(self, count: int) -> None:
        """`count` message events were written to one stream."""
