"""Token bucket per provider: a rate with a burst. Pure: the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per request."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def reserve(self, now: float) -> float:
        """Take a token; returns how long to wait before using it (0 when one was there).

        Reservations queue up: each caller gets its own future slot, so waiting callers
        leave in order at exactly the configured rate."""
        self._refill(now)
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate


def parse_rate(spec: str) -> tuple[float, float]:
    """'10' -> (10, 10); '10/20' -> rate 10 per second, burst 20."""
    rate_text, _, burst_text = spec.partition("/")
    rate = float(rate_text)
    burst = float(burst_text) if burst_text else max(1.0, rate)
    if rate <= 0 or burst < 1:
        raise ValueError(f"{spec!r}: rate must be > 0 and burst >= 1")
    return rate, burst
