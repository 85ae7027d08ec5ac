"""Map HTTP answers and transport errors to outcomes. One table for every HTTP provider."""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Mapping

from pgnotify_worker.models import Outcome, Permanent, Retryable, Sent

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date. None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def parse_rate_limit_reset(value: str | None, now: dt.datetime) -> float | None:
    """Seconds from an X-RateLimit-Reset style header: epoch seconds or seconds to wait."""
    if not value:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if number > 1_000_000_000:  # an absolute epoch timestamp
        return max(0.0, number - now.timestamp())
    return number if number >= 0 else None


def retry_after_from(
    headers: Mapping[str, str], now: dt.datetime, *, rate_limited: bool = True
) -> float | None:
    """The wait a response asks for: Retry-After first, then (for a rate limit) the common
    reset headers, which some providers send on every answer, not only on a 429."""
    lowered = {k.lower(): v for k, v in headers.items()}
    found = parse_retry_after(lowered.get("retry-after"), now)
    if found is not None or not rate_limited:
        return found
    for name in ("ratelimit-reset", "x-ratelimit-reset"):
        found = parse_rate_limit_reset(lowered.get(name), now)
        if found is not None:
            return found
    return None


def classify_http(
    status: int,
    headers: Mapping[str, str],
    now: dt.datetime,
    *,
    what: str,
    message_id: str | None = None,
) -> Outcome:
    """2xx sent; 408/425/429/5xx retryable; 3xx (never followed) and other 4xx permanent."""
    if 200 <= status < 300:
        return Sent(message_id)
    if status in RETRYABLE_STATUS or status >= 500:
        return Retryable(
            f"http_{status}",
            f"{what} answered HTTP {status}",
            retry_after_from(headers, now, rate_limited=status == 429),
            throttled=status == 429,  # the service is up and asks us to slow down
        )
    if 300 <= status < 400:
        return Permanent(
            f"http_{status}", f"{what} answered HTTP {status} (redirects are not followed)"
        )
    return Permanent(f"http_{status}", f"{what} answered HTTP {status}")
