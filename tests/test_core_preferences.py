"""The send-time rules, unsubscribe tokens and cron schedules: pure, table-driven."""

from __future__ import annotations

import datetime as dt

import pytest

from pgnotify_worker.core.cron import next_run
from pgnotify_worker.core.preferences import (
    Defer,
    Expire,
    Facts,
    Hold,
    Send,
    Skip,
    decide,
    in_window,
    seconds_until,
)
from pgnotify_worker.core.unsubscribe import ALL, TokenInvalid, Unsubscribe, make_token, read_token
from pgnotify_worker.errors import ScheduleError

T = dt.time


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (Facts(), Send()),
        (Facts(expired=True, critical=True), Expire()),
        (
            Facts(suppressed=True, critical=True),
            Skip("suppressed", "the address is on the suppression list"),
        ),
        (Facts(critical=True, unsubscribed=True, preference="off"), Send(critical=True)),
        (
            Facts(
                critical=True,
                preference="daily",
                quiet_start=T(0),
                quiet_end=T(23),
                local_time=T(12),
            ),
            Send(critical=True),
        ),
        (
            Facts(unsubscribed=True),
            Skip("unsubscribed", "the user unsubscribed from all notifications"),
        ),
        (
            Facts(requires_consent=True),
            Skip("no_consent", "the category needs an opt-in the user has not given"),
        ),
        (
            Facts(requires_consent=True, consent=False),
            Skip("no_consent", "the category needs an opt-in the user has not given"),
        ),
        (Facts(requires_consent=True, consent=True), Send()),
        (
            Facts(preference="off"),
            Skip("preference_off", "the user turned this category off for this channel"),
        ),
        (Facts(preference="daily"), Hold("daily")),
        (Facts(preference="weekly"), Hold("weekly")),
        (Facts(preference="daily", is_digest=True), Send()),
        (Facts(quiet_start=T(22), quiet_end=T(7), local_time=T(23, 30)), Defer(7.5 * 3600)),
        (Facts(quiet_start=T(22), quiet_end=T(7), local_time=T(6, 59)), Defer(60.0)),
        (Facts(quiet_start=T(22), quiet_end=T(7), local_time=T(7)), Send()),
        (Facts(quiet_start=T(12), quiet_end=T(14), local_time=T(13)), Defer(3600.0)),
        (Facts(quiet_start=T(12), quiet_end=T(14), local_time=T(11, 59)), Send()),
    ],
)
def test_decide(facts: Facts, expected: object) -> None:
    assert decide(facts) == expected


def test_an_unknown_preference_is_a_bug_not_a_send() -> None:
    with pytest.raises(ValueError, match="unknown preference"):
        decide(Facts(preference="sometimes"))


@pytest.mark.parametrize(
    ("now", "start", "end", "inside"),
    [(T(23), T(22), T(7), True), (T(3), T(22), T(7), True), (T(12), T(22), T(7), False),
     (T(9), T(9), T(17), True), (T(17), T(9), T(17), False), (T(9), T(9), T(9), False)],
)  # fmt: skip
def test_in_window(now: dt.time, start: dt.time, end: dt.time, inside: bool) -> None:
    assert in_window(now, start, end) is inside


def test_seconds_until_wraps_midnight() -> None:
    assert seconds_until(T(23), T(1)) == 7200
    assert seconds_until(T(1), T(23)) == 22 * 3600
    assert seconds_until(T(8), T(8)) == 24 * 3600


# --- unsubscribe tokens -------------------------------------------------------------------------

KEY = b"k" * 32


def test_a_token_round_trips_and_carries_no_address() -> None:
    token = make_token(KEY, "user-7", "marketing", expires=2_000_000_000)
    assert read_token(KEY, token, now=1_900_000_000) == Unsubscribe("user-7", "marketing")
    assert "user-7" not in token  # opaque: base64, never an email or id in clear
    assert read_token(KEY, make_token(KEY, "u", None, 2_000_000_000), 0) == Unsubscribe("u", ALL)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "altered"),
        (lambda t: t.replace(t.split(".")[2], "bWFya2V0aW5nMg"), "altered"),  # another category
        (lambda t: t.replace(t.split(".")[3], "2100000000"), "altered"),  # a later expiry
        (lambda t: ".".join(t.split(".")[:4]), "incomplete"),
        (lambda t: "x" + t, "incomplete"),
    ],
)
def test_tampering_is_detected(mutate: object, message: str) -> None:
    token = make_token(KEY, "user-7", "marketing", expires=2_000_000_000)
    with pytest.raises(TokenInvalid, match=message):
        read_token(KEY, mutate(token), now=0)  # type: ignore[operator]


def test_expired_and_wrong_key() -> None:
    token = make_token(KEY, "user-7", "marketing", expires=100)
    with pytest.raises(TokenInvalid, match="expired"):
        read_token(KEY, token, now=101)
    with pytest.raises(TokenInvalid, match="altered"):
        read_token(b"other" * 8, token, now=0)


# --- cron --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "zone", "after", "expected"),
    [
        ("*/5 * * * *", "UTC", "2026-11-23T10:02:00+00:00", "2026-11-23T10:05:00+00:00"),
        ("0 8 * * *", "Europe/Paris", "2026-11-23T08:00:00+00:00", "2026-11-24T07:00:00+00:00"),
        (
            "0 8 * * *",
            "Europe/Paris",
            "2026-03-28T09:00:00+00:00",
            "2026-03-29T06:00:00+00:00",
        ),  # DST
        ("0 9 * * 1", "America/New_York", "2026-11-23T15:00:00+00:00", "2026-11-30T14:00:00+00:00"),
        ("0 0 1 * *", "UTC", "2026-12-15T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ],
)
def test_next_run(schedule: str, zone: str, after: str, expected: str) -> None:
    assert next_run(schedule, zone, dt.datetime.fromisoformat(after)) == dt.datetime.fromisoformat(
        expected
    )


@pytest.mark.parametrize(
    ("schedule", "zone"),
    [("every minute", "UTC"), ("61 * * * *", "UTC"), ("* * * * *", "Mars/Base")],
)
def test_bad_schedules_are_named(schedule: str, zone: str) -> None:
    with pytest.raises(ScheduleError):
        next_run(schedule, zone, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


def test_the_dispatchers_shortcut_is_what_decide_says_without_facts() -> None:
    """A row with no user, category or address rules skips the lookup: the decision it gets must
    be decide()'s for no facts, digest or not (delivery/dispatcher.py SEND)."""
    from pgnotify_worker.delivery.dispatcher import SEND

    assert SEND == decide(Facts()) == decide(Facts(is_digest=True))
