"""Rate limit settings and the circuit breaker: pure, driven by a fake clock."""

from __future__ import annotations

import pytest

from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.core.ratelimit import parse_rate


@pytest.mark.parametrize(
    ("spec", "expected"), [("5", (5.0, 5.0)), ("10/20", (10.0, 20.0)), ("0.5", (0.5, 1.0))]
)
def test_parse_rate(spec: str, expected: tuple[float, float]) -> None:
    assert parse_rate(spec) == expected


@pytest.mark.parametrize("spec", ["0", "-1", "5/0", "fast", ""])
def test_parse_rate_refuses_nonsense(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(spec)


def test_the_circuit_opens_after_a_run_of_failures_and_probes_after_the_pause() -> None:
    breaker = CircuitBreaker(threshold=3, open_seconds=30)
    for _ in range(2):
        assert breaker.acquire(0.0)
        breaker.failure(0.0, "503")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.acquire(1.0)
    assert breaker.failure(1.0, "503") is True  # the third in a row opens it
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allows(20.0) and not breaker.acquire(20.0)
    assert breaker.opens_in(20.0) == pytest.approx(11.0)
    assert breaker.acquire(31.0)  # one probe after the pause...
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.acquire(31.0)  # ...and only one
    breaker.success()
    assert breaker.state is CircuitState.CLOSED and breaker.failures == 0


def test_a_failed_probe_reopens_the_circuit() -> None:
    breaker = CircuitBreaker(threshold=1, open_seconds=10)
    breaker.failure(0.0, "down")
    assert breaker.acquire(10.0)
    assert breaker.failure(10.0, "still down") is True  # paused again: worth a log line
    assert breaker.state is CircuitState.OPEN and breaker.opens_in(10.0) == 10.0


def test_success_resets_the_count_so_only_consecutive_failures_open() -> None:
    breaker = CircuitBreaker(threshold=3)
    for _ in range(5):
        breaker.failure(0.0, "x")
        breaker.failure(0.0, "x")
        breaker.success()
    assert breaker.state is CircuitState.CLOSED


def test_trip_opens_at_once() -> None:
    breaker = CircuitBreaker(threshold=10)
    assert breaker.failure(0.0, "invalid_api_key", trip=True) is True
    assert breaker.state is CircuitState.OPEN and breaker.reason == "invalid_api_key"


def test_a_cancelled_probe_lets_another_go() -> None:
    breaker = CircuitBreaker(threshold=1, open_seconds=1)
    breaker.failure(0.0, "x")
    assert breaker.acquire(2.0)
    breaker.release()
    assert breaker.acquire(2.0)
