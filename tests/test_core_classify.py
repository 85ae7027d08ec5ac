"""classify_http: one table from HTTP status and headers to Sent / Retryable / Permanent."""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest

from pgnotify_worker.core.classify import (
    classify_http,
    parse_rate_limit_reset,
    parse_retry_after,
    retry_after_from,
)
from pgnotify_worker.models import Permanent, Retryable, Sent

NOW = dt.datetime(2026, 11, 23, 7, 46, 45, tzinfo=dt.UTC)
EPOCH_NOW = int(NOW.timestamp())


def http_date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when, usegmt=True)


def classify(status: int, headers: dict[str, str] | None = None) -> object:
    return classify_http(status, headers or {}, NOW, what="hooks.example.com", message_id="m-1")


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_sent_with_the_message_id(status: int) -> None:
    assert classify(status) == Sent("m-1")


def test_2xx_without_message_id_is_sent_without_one() -> None:
    assert classify_http(200, {}, NOW, what="x") == Sent(None)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_transient_statuses_are_retryable(status: int) -> None:
    got = classify(status)
    assert isinstance(got, Retryable)
    assert got.code == f"http_{status}"
    assert "hooks.example.com" in got.message
    assert str(status) in got.message
    assert got.retry_after is None


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_permanent_and_say_they_are_not_followed(status: int) -> None:
    got = classify(status)
    assert isinstance(got, Permanent)
    assert got.code == f"http_{status}"
    assert "redirect" in got.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422])
def test_other_4xx_are_permanent(status: int) -> None:
    got = classify(status, {"Retry-After": "7"})
    assert isinstance(got, Permanent)
    assert got.code == f"http_{status}"
    assert str(status) in got.message
    assert "redirect" not in got.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 7 "}, 7.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": http_date(NOW + dt.timedelta(seconds=30))}, 30.0),
        ({"Retry-After": http_date(NOW + dt.timedelta(hours=2))}, 7200.0),
        ({"Retry-After": http_date(NOW - dt.timedelta(minutes=5))}, 0.0),  # already past
        ({"X-RateLimit-Reset": str(EPOCH_NOW + 60)}, 60.0),  # epoch seconds
        ({"X-RateLimit-Reset": str(EPOCH_NOW - 60)}, 0.0),  # epoch already past
        ({"X-RateLimit-Reset": "60"}, 60.0),  # delta seconds
        ({"RateLimit-Reset": "12"}, 12.0),
        ({"RateLimit-Reset": str(EPOCH_NOW + 5)}, 5.0),
        # Retry-After wins over the reset headers; RateLimit-Reset over X-RateLimit-Reset.
        ({"Retry-After": "7", "RateLimit-Reset": "12", "X-RateLimit-Reset": "60"}, 7.0),
        ({"RateLimit-Reset": "12", "X-RateLimit-Reset": "60"}, 12.0),
        # A bad Retry-After falls through to the reset headers.
        ({"Retry-After": "soon", "X-RateLimit-Reset": "60"}, 60.0),
    ],
)
def test_retry_after_is_read_from_the_headers(headers: dict[str, str], expected: float) -> None:
    got = classify(429, headers)
    assert isinstance(got, Retryable)
    assert got.retry_after == pytest.approx(expected)


@pytest.mark.parametrize(
    "name",
    ["Retry-After", "retry-after", "RETRY-AFTER", "rEtRy-AfTeR"],
)
def test_retry_after_header_name_is_case_insensitive(name: str) -> None:
    assert retry_after_from({name: "7"}, NOW) == 7.0


@pytest.mark.parametrize(
    "name", ["X-RateLimit-Reset", "x-ratelimit-reset", "X-RATELIMIT-RESET", "ratelimit-reset"]
)
def test_reset_header_names_are_case_insensitive(name: str) -> None:
    assert retry_after_from({name: "42"}, NOW) == 42.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "7 seconds", "12abc", "nan", "Tomorrow at noon", "-5", "-0.5"],
)
def test_garbage_or_negative_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", [None, "", "soon", "12abc", "nan", "-5", "-1.5"])
def test_garbage_or_negative_rate_limit_reset_is_none(value: str | None) -> None:
    assert parse_rate_limit_reset(value, NOW) is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Retry-After": "soon"},
        {"Retry-After": "-5"},
        {"X-RateLimit-Reset": "garbage"},
        {"RateLimit-Reset": "-3"},
        {"Content-Type": "application/json"},
    ],
)
def test_retryable_without_a_usable_header_has_no_retry_after(headers: dict[str, str]) -> None:
    got = classify(503, headers)
    assert isinstance(got, Retryable)
    assert got.retry_after is None


def test_http_date_without_zone_is_read_as_utc() -> None:
    value = "Mon, 23 Nov 2026 07:47:45 -0000"  # RFC 2822 "unknown zone": naive datetime
    assert parse_retry_after(value, NOW) == pytest.approx(60.0)


@pytest.mark.parametrize("value", ["²", "7²", "①"])
def test_unicode_digit_retry_after_is_ignored_not_raised(value: str) -> None:
    got = classify(429, {"Retry-After": value})
    assert isinstance(got, Retryable)
    assert got.retry_after is None
