"""Retry back-off: exponential with full jitter, Retry-After honoured. Pure: `rand` is passed in."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RETRY_AFTER = 86_400.0  # a provider asking for more than a day is treated as asking for a day


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delay before attempt n+1 after attempt n failed transiently."""

    base: float = 5.0  # seconds; the ceiling of the first delay
    cap: float = 3600.0  # no back-off grows beyond this (a provider's Retry-After may ask for more)
    retry_after_jitter: float = 0.1  # spread retries that share one Retry-After by up to 10 %

    def ceiling(self, attempt: int) -> float:
        """The largest delay after `attempt` (1-based): base * 2^(attempt-1), capped."""
        exponent = min(max(attempt, 1) - 1, 62)
        return min(self.cap, self.base * (2.0**exponent))

    def delay(self, attempt: int, retry_after: float | None, rand: float) -> float:
        """Seconds to wait; `rand` is uniform in [0, 1)."""
        if retry_after is not None and retry_after > 0:
            # The provider said when: never earlier (our cap does not shorten it), a little later
            # so rows throttled together do not come back together.
            wait = min(retry_after, MAX_RETRY_AFTER)
            return wait * (1.0 + self.retry_after_jitter * rand)
        # Full jitter (AWS architecture blog): uniform over [0, ceiling].
        return self.ceiling(attempt) * rand
