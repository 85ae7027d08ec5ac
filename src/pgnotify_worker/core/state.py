"""Notification states, what may follow what, and how an outcome maps to the next state."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import assert_never

from pgnotify_worker.core.preferences import Decision, Defer, Expire, Hold, Send, Skip
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.models import Outcome, Permanent, Retryable, Sent, Skipped


class Status(enum.StrEnum):
    """The status column of pgnotify.notifications."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    PROCESSING = "processing"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    HELD = "held"  # waiting for the next digest
    DIGESTED = "digested"  # went out inside a digest
    EXPIRED = "expired"  # past expires_at, not sent


class Event(enum.StrEnum):
    """The event column of pgnotify.events."""

    CLAIMED = "claimed"
    SENT = "sent"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    LEASE_EXPIRED = "lease_expired"
    RELEASED = "released"
    REPLAYED = "replayed"
    HELD = "held"
    DEFERRED = "deferred"
    EXPIRED = "expired"
    DIGESTED = "digested"


TERMINAL = frozenset(
    {
        Status.SENT,
        Status.FAILED,
        Status.DEAD,
        Status.CANCELLED,
        Status.SKIPPED,
        Status.DIGESTED,
        Status.EXPIRED,
    }
)

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SCHEDULED: frozenset({Status.QUEUED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.PROCESSING, Status.CANCELLED}),
    Status.PROCESSING: frozenset(
        {
            Status.SENT,
            Status.FAILED,
            Status.DEAD,
            Status.SKIPPED,
            Status.SCHEDULED,  # retry later, or after the recipient's quiet hours
            Status.QUEUED,  # released on shutdown, or requeued after the lease expired
            Status.HELD,  # for a digest
            Status.EXPIRED,
        }
    ),
    Status.HELD: frozenset({Status.DIGESTED, Status.CANCELLED}),
    Status.DIGESTED: frozenset(),
    Status.EXPIRED: frozenset(),
    Status.SENT: frozenset(),
    Status.FAILED: frozenset({Status.QUEUED}),  # pgnotify.retry()
    Status.DEAD: frozenset({Status.QUEUED}),  # pgnotify.retry()
    Status.CANCELLED: frozenset(),
    Status.SKIPPED: frozenset(),
}


def can_move(current: Status, new: Status) -> bool:
    """True when `new` may follow `current`."""
    return new in TRANSITIONS[current]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the write-back does with one attempt's outcome."""

    status: Status
    event: Event
    delay: float = 0.0  # seconds from database now() to the next attempt (SCHEDULED only)
    error_code: str | None = None
    error: str | None = None
    provider_message_id: str | None = None
    refund: bool = False  # the attempt does not count (held, deferred: nothing was tried)
    hold: str | None = None  # daily | weekly when HELD

    def __post_init__(self) -> None:
        # every resolution ends a claim: the transition table is the one place that says which
        # states may follow a claimed (processing) row
        if not can_move(Status.PROCESSING, self.status):
            raise ValueError(f"a claimed notification cannot become {self.status.value}")


def decision_resolution(decision: Decision) -> Resolution | None:
    """The write-back for a decision taken before any send; None when the row is to be sent."""
    match decision:
        case Send():
            return None
        case Skip(code=code, reason=reason):
            return Resolution(Status.SKIPPED, Event.SKIPPED, error_code=code, error=reason)
        case Expire():
            return Resolution(
                Status.EXPIRED,
                Event.EXPIRED,
                error_code="expired",
                error="past its expires_at: not sent",
            )
        case Hold(kind=kind):
            return Resolution(Status.HELD, Event.HELD, refund=True, hold=kind)
        case Defer(seconds=seconds, code=code):
            return Resolution(
                Status.SCHEDULED,
                Event.DEFERRED,
                delay=seconds,
                refund=True,
                error_code=code,
            )
        case _:
            assert_never(decision)


def resolve(
    outcome: Outcome, attempt: int, max_attempts: int, policy: RetryPolicy, rand: float
) -> Resolution:
    """Decide the next state after `attempt` ended with `outcome`."""
    match outcome:
        case Sent(provider_message_id=pmid):
            return Resolution(Status.SENT, Event.SENT, provider_message_id=pmid)
        case Permanent(code=code, message=message):
            return Resolution(Status.FAILED, Event.FAILED, error_code=code, error=message)
        case Skipped(code=code, message=message):
            return Resolution(Status.SKIPPED, Event.SKIPPED, error_code=code, error=message)
        case Retryable(code=code, message=message, retry_after=retry_after) if (
            outcome.throttled or not outcome.tried
        ):
            # Waiting for a paused provider, a 429's Retry-After or the database spends no
            # attempt: attempts count real sends (expires_at is how waiting ends).
            delay = policy.delay(attempt, retry_after, rand)
            return Resolution(
                Status.SCHEDULED,
                Event.RETRY_SCHEDULED,
                delay=delay,
                error_code=code,
                error=message,
                refund=True,
            )
        case Retryable(code=code, message=message, retry_after=retry_after):
            if attempt >= max_attempts:
                return Resolution(
                    Status.DEAD,
                    Event.DEAD,
                    error_code=code,
                    error=f"{message} (gave up after {attempt} attempts)",
                )
            delay = policy.delay(attempt, retry_after, rand)
            return Resolution(
                Status.SCHEDULED, Event.RETRY_SCHEDULED, delay=delay, error_code=code, error=message
            )
        case _:
            assert_never(outcome)
