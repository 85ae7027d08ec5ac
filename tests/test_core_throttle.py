"""core.throttle: fixed windows from the epoch, exact at their edges, and what a send over the
limit becomes for each action."""

from __future__ import annotations

import pytest

from pgnotify_worker.core.preferences import Defer, Hold, Send, Skip
from pgnotify_worker.core.state import Event, Status, decision_resolution
from pgnotify_worker.core.throttle import Take, Window, describe, verdict, window_of

DAY = 86400.0


@pytest.mark.parametrize(
    ("at", "length", "expected"),
    [
        (0.0, 60.0, Window(0.0, 60.0)),
        (59.999999, 60.0, Window(0.0, 60.0)),  # the last microsecond is still inside
        (60.0, 60.0, Window(60.0, 120.0)),  # the edge belongs to the next window
        (60.000001, 60.0, Window(60.0, 120.0)),
        (1_764_288_000.0, DAY, Window(1_764_288_000.0, 1_764_288_000.0 + DAY)),  # UTC midnight
        (1_764_287_999.999999, DAY, Window(1_764_288_000.0 - DAY, 1_764_288_000.0)),
        (-1.0, 60.0, Window(-60.0, 0.0)),  # before the epoch: floor, not truncation
        (7199.5, 3600.0, Window(3600.0, 7200.0)),
    ],
)
def test_window_of_is_exact_at_the_edges(at: float, length: float, expected: Window) -> None:
    assert window_of(at, length) == expected


def test_a_window_needs_a_length() -> None:
    with pytest.raises(ValueError, match="longer than 0"):
        window_of(10.0, 0.0)


def take(action: str, *, allowed: bool = False, now: float = 3599.25) -> Take:
    return Take(allowed, 3, 3, window_of(now, 3600.0), action, now)


def test_within_the_limit_sends_whatever_the_action() -> None:
    for action in ("drop", "delay", "batch"):
        assert verdict(take(action, allowed=True)) == Send()
    assert verdict(None) == Send()  # the category has no throttle


def test_drop_skips_with_the_reason() -> None:
    decision = verdict(take("drop"))
    assert decision == Skip(
        "throttled", "the category allows 3 per 1 hour to this recipient: dropped"
    )
    resolution = decision_resolution(decision)
    assert resolution is not None
    assert (resolution.status, resolution.event, resolution.error_code) == (
        Status.SKIPPED,
        Event.SKIPPED,
        "throttled",
    )


def test_delay_waits_exactly_until_the_next_window_opens() -> None:
    assert verdict(take("delay", now=3599.25)) == Defer(0.75, code="throttled")
    assert verdict(take("delay", now=3600.0 - 1e-6)) == Defer(pytest.approx(1e-6), code="throttled")
    # a take answered just after the edge (the database clock moved on) never waits negative
    late = Take(False, 3, 3, Window(0.0, 3600.0), "delay", 3600.5)
    assert verdict(late) == Defer(0.0, code="throttled")
    resolution = decision_resolution(verdict(take("delay")))
    assert resolution is not None
    assert (resolution.status, resolution.error_code, resolution.refund) == (
        Status.SCHEDULED,
        "throttled",
        True,  # waiting for a throttle never spends an attempt
    )


def test_batch_folds_the_extra_into_a_batch() -> None:
    assert verdict(take("batch")) == Hold("batch")
    resolution = decision_resolution(Hold("batch"))
    assert resolution is not None
    assert (resolution.status, resolution.hold, resolution.refund) == (Status.HELD, "batch", True)


def test_an_unknown_action_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown throttle action"):
        verdict(take("explode"))


@pytest.mark.parametrize(
    ("limit", "length", "text"),
    [
        (3, DAY, "3 per 1 day"),
        (1, 7 * DAY, "1 per 7 days"),
        (10, 3600.0, "10 per 1 hour"),
        (5, 900.0, "5 per 15 minutes"),
        (2, 90.0, "2 per 90 s"),
    ],
)
def test_describe(limit: int, length: float, text: str) -> None:
    assert describe(limit, length) == text
