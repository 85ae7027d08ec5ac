"""resolve(): how one attempt's outcome maps to the next state; the transition table."""

from __future__ import annotations

import pytest

from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.state import (
    TERMINAL,
    TRANSITIONS,
    Event,
    Resolution,
    Status,
    can_move,
    resolve,
)
from pgnotify_worker.models import Permanent, Retryable, Sent

POLICY = RetryPolicy(base=5.0, cap=3600.0)


@pytest.mark.parametrize("attempt", [1, 3, 5])
@pytest.mark.parametrize("pmid", ["msg-123", None])
def test_sent_becomes_sent_with_the_provider_message_id(attempt: int, pmid: str | None) -> None:
    got = resolve(Sent(pmid), attempt=attempt, max_attempts=5, policy=POLICY, rand=0.5)
    assert got == Resolution(Status.SENT, Event.SENT, provider_message_id=pmid)
    assert got.delay == 0.0
    assert got.error is None


@pytest.mark.parametrize("attempt", [1, 5, 9])
def test_permanent_becomes_failed_with_code_and_message(attempt: int) -> None:
    outcome = Permanent("http_410", "hooks.example.com answered HTTP 410")
    got = resolve(outcome, attempt=attempt, max_attempts=5, policy=POLICY, rand=0.5)
    assert got.status is Status.FAILED
    assert got.event is Event.FAILED
    assert got.error_code == "http_410"
    assert got.error == "hooks.example.com answered HTTP 410"
    assert got.provider_message_id is None


@pytest.mark.parametrize(
    ("attempt", "retry_after", "rand"),
    [(1, None, 0.5), (2, None, 0.0), (4, None, 0.9), (1, 30.0, 0.5), (4, 7.0, 0.0)],
)
def test_retryable_below_max_attempts_is_scheduled_with_the_policy_delay(
    attempt: int, retry_after: float | None, rand: float
) -> None:
    outcome = Retryable("http_503", "answered HTTP 503", retry_after)
    got = resolve(outcome, attempt=attempt, max_attempts=5, policy=POLICY, rand=rand)
    assert got.status is Status.SCHEDULED
    assert got.event is Event.RETRY_SCHEDULED
    assert got.delay == POLICY.delay(attempt, retry_after, rand)
    assert got.error_code == "http_503"
    assert got.error == "answered HTTP 503"


def test_retryable_delay_comes_from_the_policy_given() -> None:
    outcome = Retryable("timeout", "timed out")
    slow = RetryPolicy(base=100.0, cap=1000.0)
    got = resolve(outcome, attempt=2, max_attempts=5, policy=slow, rand=0.5)
    assert got.delay == pytest.approx(100.0)  # ceiling 200, half of it


@pytest.mark.parametrize(("attempt", "max_attempts"), [(5, 5), (1, 1), (7, 5)])
def test_retryable_at_max_attempts_is_dead(attempt: int, max_attempts: int) -> None:
    outcome = Retryable("http_503", "answered HTTP 503", 30.0)
    got = resolve(outcome, attempt=attempt, max_attempts=max_attempts, policy=POLICY, rand=0.5)
    assert got.status is Status.DEAD
    assert got.event is Event.DEAD
    assert got.error_code == "http_503"
    assert got.error is not None
    assert "answered HTTP 503" in got.error
    assert f"gave up after {attempt} attempts" in got.error
    assert got.delay == 0.0


def test_every_status_has_a_transition_entry_and_targets_are_statuses() -> None:
    assert set(TRANSITIONS) == set(Status)
    for targets in TRANSITIONS.values():
        assert all(isinstance(t, Status) for t in targets)


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_states_have_no_exits_except_replay(status: Status) -> None:
    replayable = {Status.FAILED, Status.DEAD}
    expected = {Status.QUEUED} if status in replayable else set()
    assert set(TRANSITIONS[status]) == expected


def test_terminal_set_is_what_the_worker_never_touches_again() -> None:
    expected = {
        Status.SENT,
        Status.FAILED,
        Status.DEAD,
        Status.CANCELLED,
        Status.SKIPPED,
        Status.DIGESTED,
        Status.EXPIRED,
    }
    assert set(TERMINAL) == expected


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (Status.SCHEDULED, Status.QUEUED, True),
        (Status.SCHEDULED, Status.CANCELLED, True),
        (Status.SCHEDULED, Status.PROCESSING, False),
        (Status.QUEUED, Status.PROCESSING, True),
        (Status.QUEUED, Status.SENT, False),
        (Status.PROCESSING, Status.SENT, True),
        (Status.PROCESSING, Status.FAILED, True),
        (Status.PROCESSING, Status.DEAD, True),
        (Status.PROCESSING, Status.SKIPPED, True),
        (Status.PROCESSING, Status.SCHEDULED, True),
        (Status.PROCESSING, Status.QUEUED, True),
        (Status.SENT, Status.QUEUED, False),
        (Status.SENT, Status.PROCESSING, False),
        (Status.FAILED, Status.QUEUED, True),
        (Status.DEAD, Status.QUEUED, True),
        (Status.DEAD, Status.SCHEDULED, False),
        (Status.CANCELLED, Status.QUEUED, False),
        (Status.SKIPPED, Status.QUEUED, False),
    ],
)
def test_can_move(current: Status, new: Status, allowed: bool) -> None:
    assert can_move(current, new) is allowed


def test_every_resolution_status_may_follow_processing() -> None:
    outcomes = [Sent("x"), Permanent("c", "m"), Retryable("c", "m"), Retryable("c", "m", 5.0)]
    for outcome in outcomes:
        for attempt in (1, 5):
            got = resolve(outcome, attempt=attempt, max_attempts=5, policy=POLICY, rand=0.3)
            assert can_move(Status.PROCESSING, got.status)


def test_statuses_match_the_database_column_values() -> None:
    assert {s.value for s in Status} == {
        "scheduled",
        "queued",
        "processing",
        "sent",
        "failed",
        "dead",
        "cancelled",
        "skipped",
        "held",
        "digested",
        "expired",
    }


@pytest.mark.parametrize(
    "outcome",
    [
        Retryable("circuit_open", "every webhook provider is paused", 3.0, tried=False),
        Retryable("http_429", "slow down", 2.0, throttled=True),
        Retryable("database", "lookup failed", tried=False),
    ],
)
def test_waiting_spends_no_attempt_and_never_goes_dead(outcome: Retryable) -> None:
    policy = RetryPolicy(base=1.0, cap=10.0)
    resolution = resolve(outcome, attempt=5, max_attempts=5, policy=policy, rand=0.5)
    assert resolution.status is Status.SCHEDULED
    assert resolution.refund
    if outcome.retry_after:
        assert resolution.delay >= outcome.retry_after


def test_a_real_failure_at_the_last_attempt_goes_dead() -> None:
    policy = RetryPolicy(base=1.0, cap=10.0)
    resolution = resolve(Retryable("http_503", "down"), 5, 5, policy, 0.5)
    assert (resolution.status, resolution.refund) == (Status.DEAD, False)


def test_a_resolution_can_only_be_a_state_a_claimed_row_may_move_to() -> None:
    with pytest.raises(ValueError, match="cannot become cancelled"):
        Resolution(Status.CANCELLED, Event.CANCELLED)
