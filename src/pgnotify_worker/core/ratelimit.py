"""Rate limit settings: `rate[/burst]`. The buckets themselves are shared by every replica and
live in PostgreSQL (schema/0007_rate_limits.sql, delivery.limits)."""

from __future__ import annotations


def parse_rate(spec: str) -> tuple[float, float]:
    """'10' -> (10, 10); '10/20' -> rate 10 per second, burst 20."""
    rate_text, _, burst_text = spec.partition("/")
    rate = float(rate_text)
    burst = float(burst_text) if burst_text else max(1.0, rate)
    if rate <= 0 or burst < 1:
        raise ValueError(f"{spec!r}: rate must be > 0 and burst >= 1")
    return rate, burst
