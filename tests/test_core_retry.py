"""RetryPolicy: exponential ceiling, full jitter, Retry-After honoured. Pure: rand is passed in."""

from __future__ import annotations

import math

import pytest

from pgnotify_worker.core.retry import MAX_RETRY_AFTER, RetryPolicy

ALMOST_ONE = 1.0 - 1e-12  # the largest kind of value random.random() returns


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, 5.0),
        (2, 10.0),
        (3, 20.0),
        (4, 40.0),
        (10, 2560.0),
        (11, 3600.0),  # 5120 capped
        (12, 3600.0),
        (0, 5.0),  # nonsense attempts behave like the first one
        (-3, 5.0),
    ],
)
def test_ceiling_is_base_times_two_to_the_attempt_minus_one_capped(
    attempt: int, expected: float
) -> None:
    assert RetryPolicy(base=5.0, cap=3600.0).ceiling(attempt) == expected


@pytest.mark.parametrize("attempt", [63, 64, 1_000, 10**9, 10**18, 2**200])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    policy = RetryPolicy(base=5.0, cap=3600.0)
    assert policy.ceiling(attempt) == 3600.0
    delay = policy.delay(attempt, None, ALMOST_ONE)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= 3600.0


def test_ceiling_never_decreases_with_the_attempt() -> None:
    policy = RetryPolicy(base=0.5, cap=100.0)
    ceilings = [policy.ceiling(n) for n in range(1, 80)]
    assert ceilings == sorted(ceilings)
    assert ceilings[-1] == 100.0


@pytest.mark.parametrize("attempt", [1, 2, 5, 20])
def test_full_jitter_spans_zero_to_the_ceiling(attempt: int) -> None:
    policy = RetryPolicy(base=5.0, cap=3600.0)
    ceiling = policy.ceiling(attempt)
    assert policy.delay(attempt, None, 0.0) == 0.0
    assert policy.delay(attempt, None, 0.5) == pytest.approx(ceiling / 2)
    assert policy.delay(attempt, None, ALMOST_ONE) == pytest.approx(ceiling)
    assert policy.delay(attempt, None, ALMOST_ONE) <= ceiling


@pytest.mark.parametrize("retry_after", [0.0, -1.0])
def test_zero_or_negative_retry_after_falls_back_to_jitter(retry_after: float) -> None:
    policy = RetryPolicy(base=5.0, cap=3600.0)
    assert policy.delay(3, retry_after, 0.5) == pytest.approx(10.0)


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, ALMOST_ONE])
@pytest.mark.parametrize("retry_after", [0.5, 7.0, 120.0, 3000.0])
def test_retry_after_is_honoured_never_earlier_at_most_ten_percent_later(
    retry_after: float, rand: float
) -> None:
    policy = RetryPolicy(base=5.0, cap=3600.0)
    # The attempt does not matter: the provider said when.
    for attempt in (1, 8, 50):
        delay = policy.delay(attempt, retry_after, rand)
        assert delay >= retry_after
        assert delay <= retry_after * 1.1 + 1e-9


def test_retry_after_exactly_when_rand_is_zero() -> None:
    assert RetryPolicy().delay(1, 42.0, 0.0) == 42.0


@pytest.mark.parametrize("rand", [0.0, 0.5, ALMOST_ONE])
@pytest.mark.parametrize("retry_after", [3600.0, 7200.0, 50_000.0])
def test_retry_after_beyond_our_cap_is_still_honoured(retry_after: float, rand: float) -> None:
    # Our back-off cap does not shorten what the provider asked for.
    delay = RetryPolicy(base=5.0, cap=3600.0).delay(1, retry_after, rand)
    assert retry_after <= delay <= retry_after * 1.1 + 1e-9


@pytest.mark.parametrize("retry_after", [MAX_RETRY_AFTER * 2, 1e12, 1e300, math.inf])
def test_absurd_retry_after_is_clamped_to_a_day(retry_after: float) -> None:
    policy = RetryPolicy(base=5.0, cap=3600.0)
    assert MAX_RETRY_AFTER == 86_400.0
    assert policy.delay(1, retry_after, 0.0) == MAX_RETRY_AFTER
    delay = policy.delay(1, retry_after, ALMOST_ONE)
    assert math.isfinite(delay)
    assert MAX_RETRY_AFTER <= delay <= MAX_RETRY_AFTER * 1.1 + 1e-6
