"""NOTIFY payloads and the idempotency key of a claimed notification."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from pgnotify_worker.models import (
    CHANNELS,
    Notification,
    Ping,
    TemplatesChanged,
    Unknown,
    Wake,
    WakeChannel,
    WakeScheduled,
    WakeWorkflows,
    parse_wake,
)

T0 = dt.datetime(2026, 11, 23, 7, 46, 45, tzinfo=dt.UTC)


@pytest.mark.parametrize("channel", CHANNELS)
def test_channel_payload_wakes_that_channel(channel: str) -> None:
    assert parse_wake(channel) == WakeChannel(channel)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("scheduled", WakeScheduled()),
        ("templates", TemplatesChanged()),
        ("workflows", WakeWorkflows()),
        ("ping:abc", Ping("abc")),
        ("ping:", Ping("")),
        ("ping:a:b", Ping("a:b")),
        ("fax", Unknown("fax")),
        ("", Unknown("")),
        ("EMAIL", Unknown("EMAIL")),  # channel names are exact
        (" email", Unknown(" email")),
        ("channel:email", Unknown("channel:email")),
        ("pingabc", Unknown("pingabc")),
    ],
)
def test_parse_wake(payload: str, expected: Wake) -> None:
    assert parse_wake(payload) == expected


def notification(**changes: object) -> Notification:
    base = Notification(
        id=1,
        uid="0192f1c4-7d3e-7a6b-9c1d-2e3f4a5b6c7d",
        channel="webhook",
        recipient="https://hooks.example.com/in",
        user_id=None,
        category=None,
        template=None,
        subject=None,
        body="hi",
        html_body=None,
        locale=None,
        payload={},
        priority=0,
        attempt=1,
        max_attempts=5,
        created_at=T0,
        claimed_at=T0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_idempotency_key_is_pgn_plus_uid() -> None:
    assert notification().idempotency_key == "pgn_0192f1c4-7d3e-7a6b-9c1d-2e3f4a5b6c7d"


def test_idempotency_key_is_stable_across_attempts_and_claims() -> None:
    first = notification()
    retried = notification(attempt=4, claimed_at=T0 + dt.timedelta(hours=1), id=1)
    assert retried.idempotency_key == first.idempotency_key
    assert notification(uid="other").idempotency_key == "pgn_other"
