"""Circuit breaker per provider: closed -> open after a run of failures -> half-open probe.

Pure: the caller passes the clock. While open, no row is claimed for the provider (nothing is
burned against a dead service); after `open_seconds` one probe may go; its result closes or
re-opens the circuit."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CircuitState(enum.StrEnum):
    """The three states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Counts consecutive retryable failures; success resets."""

    threshold: int = 5
    open_seconds: float = 30.0
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    reason: str | None = None

    def allows(self, now: float) -> bool:
        """May a send go to this provider now? (Does not take the probe.)"""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            return now - self.opened_at >= self.open_seconds
        return not self.probing

    def acquire(self, now: float) -> bool:
        """Like allows(), and in half-open takes the single probe slot."""
        if self.state is CircuitState.OPEN and now - self.opened_at >= self.open_seconds:
            self.state = CircuitState.HALF_OPEN
            self.probing = False
        if self.state is CircuitState.HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
            return True
        return self.state is CircuitState.CLOSED

    def opens_in(self, now: float) -> float:
        """Seconds until a probe may go (0 when sends may go now)."""
        if self.state is CircuitState.OPEN:
            return max(0.0, self.open_seconds - (now - self.opened_at))
        return 0.0

    def release(self) -> None:
        """A probe that ended without an answer (cancelled): let another one go."""
        if self.state is CircuitState.HALF_OPEN:
            self.probing = False

    def success(self) -> None:
        """The provider answered (sent, or a permanent error about the message itself)."""
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.probing = False
        self.reason = None

    def failure(self, now: float, reason: str, *, trip: bool = False) -> bool:
        """A retryable failure; `trip` opens at once (bad credentials). True if it opened now."""
        self.failures += 1
        self.reason = reason
        if self.state is CircuitState.HALF_OPEN or trip or self.failures >= self.threshold:
            was_open = self.state is CircuitState.OPEN
            self.state = CircuitState.OPEN
            self.opened_at = now
            self.probing = False
            return not was_open
        return False
