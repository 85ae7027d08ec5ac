"""Values that cross boundaries: claimed rows, rendered messages, send outcomes, wake-ups."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

Channel = Literal["email", "sms", "push", "webhook", "inapp"]
CHANNELS: tuple[Channel, ...] = ("email", "sms", "push", "webhook", "inapp")


@dataclass(frozen=True, slots=True)
class Notification:
    """A row the worker has claimed (its lease is held for `attempt`)."""

    id: int
    uid: str
    channel: str
    recipient: str
    user_id: str | None
    category: str | None
    template: str | None
    subject: str | None
    body: str | None
    html_body: str | None
    locale: str | None
    payload: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    created_at: dt.datetime
    claimed_at: dt.datetime  # database time of the claim
    expires_at: dt.datetime | None = None
    digest_of: str | None = None  # a digest notification: daily | weekly
    traceparent: str | None = None  # the producer's W3C trace context

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and workers, so a provider can drop a duplicate."""
        return f"pgn_{self.uid}"


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """What a provider sends: the notification with its template applied."""

    notification_id: int
    idempotency_key: str
    channel: str
    recipient: str
    subject: str | None
    text: str | None
    html: str | None
    data: dict[str, Any]
    user_id: str | None = None
    category: str | None = None
    template: str | None = None
    template_version: int | None = None
    attempt: int = 1
    created_at: dt.datetime | None = None
    unsubscribe_url: str | None = None


# --- outcomes: every provider call ends as exactly one of these -------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """The provider accepted the message."""

    provider_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Retryable:
    """A transient failure; try again later (not before `retry_after` seconds if given).

    `throttled`: the provider is up but asked us to slow down (429): no strike on its circuit.
    `trip`: the provider cannot work for anyone right now (bad credentials, quota spent):
    open its circuit at once so rows wait instead of failing one by one.
    `tried`: False when nothing reached a provider (every provider paused, a lookup failed).
    A throttled or untried outcome is waiting, not a failed attempt: it spends no attempt."""

    code: str
    message: str
    retry_after: float | None = None
    throttled: bool = False
    trip: bool = False
    tried: bool = True


@dataclass(frozen=True, slots=True)
class Permanent:
    """Retrying cannot help: bad recipient, rejected content, refused target.

    `suppress`: the address must not be sent to again (STOP, hard bounce): the reason.
    `deactivate`: the device token is dead (push): mark the device inactive."""

    code: str
    message: str
    suppress: str | None = None
    deactivate: bool = False


@dataclass(frozen=True, slots=True)
class Skipped:
    """Deliberately not sent (no device to send to, an opt-out, a suppressed address)."""

    code: str
    message: str


Outcome = Sent | Retryable | Permanent | Skipped


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a provider's shared rate limit granted (pgnotify.take_tokens).

    `ready_in`: seconds until the granted tokens may be used (0 unless reserved ahead);
    `next_in`: seconds until one more token is free; `paused_for`: seconds the provider stays
    paused for every replica (a 429's Retry-After; nothing is granted meanwhile)."""

    granted: int
    ready_in: float = 0.0
    next_in: float = 0.0
    paused_for: float = 0.0


# --- wake-ups: the payloads of NOTIFY pgnotify ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """One attempt's outcome, ready for the batched write-back."""

    id: int
    attempt: int
    status: str
    event: str
    delay: float
    error_code: str | None
    error: str | None
    provider: str | None
    provider_message_id: str | None
    duration_ms: float | None
    template_version: int | None
    refund: int = 0
    hold: str | None = None
    claimed_at: dt.datetime | None = None  # the event's claimed_at (the timeline's claimed step)


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """A stored template version."""

    key: str
    channel: str
    locale: str
    version: int
    subject: str | None
    body: str | None
    html_body: str | None


@dataclass
class ListenerState:
    """What /readyz and /status report about the listener."""

    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None
    last_ping_ms: float | None = None
    backend_pid: int | None = None


@dataclass(frozen=True, slots=True)
class WakeChannel:
    """Rows of this channel became ready."""

    channel: str


@dataclass(frozen=True, slots=True)
class WakeScheduled:
    """Rows were scheduled; the earliest run_at may have moved."""


@dataclass(frozen=True, slots=True)
class WakeWorkflows:
    """A workflow run was triggered (pgnotify.trigger)."""


@dataclass(frozen=True, slots=True)
class TemplatesChanged:
    """pgnotify.templates changed; drop cached templates."""


@dataclass(frozen=True, slots=True)
class Ping:
    """A listener health-check round trip."""

    token: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A payload this version does not know (a newer producer); treated as a poll."""

    payload: str = field(default="")


Wake = WakeChannel | WakeScheduled | WakeWorkflows | TemplatesChanged | Ping | Unknown


def parse_wake(payload: str) -> Wake:
    """Map a NOTIFY payload to what it asks the worker to do."""
    if payload in CHANNELS:
        return WakeChannel(payload)
    if payload == "scheduled":
        return WakeScheduled()
    if payload == "templates":
        return TemplatesChanged()
    if payload == "workflows":
        return WakeWorkflows()
    if payload.startswith("ping:"):
        return Ping(payload[5:])
    return Unknown(payload)
