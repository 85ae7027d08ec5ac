"""Map HTTP answers and transport errors to outcomes. One table for every HTTP provider."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
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


# --- provider-specific tables: they override the generic one ---------------------------------

RESEND_TRIP = frozenset(
    {
        "missing_api_key",
        "restricted_api_key",
        "invalid_api_key",
        "daily_quota_exceeded",
        "monthly_quota_exceeded",
    }
)


def classify_resend(
    status: int, name: str | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """Resend's error `name`s (https://resend.com/docs/api-reference/errors)."""
    what = f"resend {name or status}"
    if name in RESEND_TRIP or (status == 403 and name == "validation_error"):
        # credentials, an unverified domain, a spent quota: every send would fail the same way
        quota = name in ("daily_quota_exceeded", "monthly_quota_exceeded")
        wait = retry_after_from(headers, now) if quota else None
        return Retryable(f"resend_{name}", f"{what}: {message}", wait, trip=True)
    if name == "rate_limit_exceeded":
        return Retryable(
            "resend_rate_limited", f"{what}", retry_after_from(headers, now), throttled=True
        )
    if name == "concurrent_idempotent_requests":
        return Retryable("resend_concurrent", f"{what}: the first attempt is still in flight", 1.0)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="resend")
    return Permanent(f"resend_{name or status}", f"{what}: {message}")


def classify_sendgrid(
    status: int, message: str, headers: Mapping[str, str], now: dt.datetime, message_id: str | None
) -> Outcome:
    """SendGrid v3 mail/send: 202 accepted; 401/403/451 pause; 429 reset header; 5xx retry."""
    if status in (200, 202):
        return Sent(message_id)
    if status in (401, 403, 451):
        return Retryable(
            f"sendgrid_{status}", f"sendgrid HTTP {status}: {message}", None, trip=True
        )
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="sendgrid")
    return Permanent(f"sendgrid_{status}", f"sendgrid HTTP {status}: {message}")


TWILIO_BAD_NUMBER = frozenset({21211, 21612, 21614, 21635, 30005, 30006})
TWILIO_CONFIG = frozenset({20003, 21606, 21608, 21408, 20404})


def classify_twilio(
    status: int, code: int | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """Twilio error codes (https://www.twilio.com/docs/api/errors)."""
    what = f"twilio {code or status}"
    if code == 21610:
        return Permanent(
            "twilio_21610", f"{what}: the recipient replied STOP", suppress="unsubscribed"
        )
    if code in TWILIO_BAD_NUMBER:
        return Permanent(f"twilio_{code}", f"{what}: {message}", suppress="invalid_number")
    if code in TWILIO_CONFIG or status == 401:
        return Retryable(f"twilio_{code or status}", f"{what}: {message}", None, trip=True)
    if code == 20429 or status == 429:
        return Retryable("twilio_20429", what, retry_after_from(headers, now), throttled=True)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="twilio")
    return Permanent(f"twilio_{code or status}", f"{what}: {message}")


FCM_DEAD_TOKEN = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})


def classify_fcm(
    status: int, error_code: str | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """FCM v1 FcmError codes (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)."""
    what = f"fcm {error_code or status}"
    if error_code in FCM_DEAD_TOKEN or (status == 404 and error_code is None):
        return Permanent(
            f"fcm_{error_code or 'not_found'}", f"{what}: token no longer valid", deactivate=True
        )
    if error_code == "INVALID_ARGUMENT" or status == 400:
        dead = "registration token" in message.lower() and "not a valid" in message.lower()
        return Permanent("fcm_INVALID_ARGUMENT", f"{what}: {message}", deactivate=dead)
    if error_code in ("THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR") or status in (401, 403):
        return Retryable(f"fcm_{error_code or status}", f"{what}: {message}", None, trip=True)
    if error_code == "QUOTA_EXCEEDED" or status == 429:
        wait = retry_after_from(headers, now) or 60.0  # FCM: at least a minute for quota errors
        return Retryable("fcm_QUOTA_EXCEEDED", what, wait, throttled=True)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="fcm")
    return Permanent(f"fcm_{error_code or status}", f"{what}: {message}")


def classify_smtp(code: int, message: str) -> Outcome:
    """SMTP reply codes: 4xx transient, 5xx permanent (530/535 bad credentials: pause)."""
    text = f"smtp {code}: {message}"[:300]
    if code in (530, 534, 535, 538):
        return Retryable(f"smtp_{code}", text, None, trip=True)
    if 400 <= code < 500:
        return Retryable(f"smtp_{code}", text, None, throttled=code in (421, 450, 451, 452))
    if re.search(r"\b5\.1\.(?:0|1|10)\b", message):  # enhanced status: no such mailbox
        return Permanent(f"smtp_{code}", text, suppress="hard_bounce")
    return Permanent(f"smtp_{code}", text)
