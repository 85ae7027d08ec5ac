"""Helpers for provider tests: a Dispatcher without a database, a hand-moved clock, a claimed
notification, a check of a retryable outcome, and the check that no secret shows in logs."""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest

from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.core.circuit import CircuitBreaker
from pgnotify_worker.core.retry import RetryPolicy
from pgnotify_worker.core.templates import Renderer
from pgnotify_worker.delivery.destinations import Destinations
from pgnotify_worker.delivery.dispatcher import Dispatcher
from pgnotify_worker.delivery.failover import ChannelProviders, Failover
from pgnotify_worker.delivery.templates import TemplateStore
from pgnotify_worker.models import Notification, Outcome, Retryable


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_dispatcher(
    channels: dict[str, ChannelProviders],
    clock: Callable[[], float] = time.monotonic,
    on_circuit: Callable[[str, CircuitBreaker], None] = lambda _p, _b: None,
    on_failover: Callable[[str, str], None] = lambda _c, _p: None,
    destinations: Destinations | None = None,
    **kwargs: Any,
) -> Dispatcher:
    """A Dispatcher without a database: send_chain, capacity and deliver (no fan-out) need none."""
    return Dispatcher(
        Failover(
            channels,
            on_circuit=on_circuit,
            on_failover=on_failover,
            clock=clock,
            destinations=destinations,
        ),
        TemplateStore(cast(QueueStore, None)),
        Renderer(),
        RetryPolicy(base=0.05, cap=0.2),
        **kwargs,
    )


def notification(channel: str, recipient: str, attempt: int = 1) -> Notification:
    now = dt.datetime.now(dt.UTC)
    return Notification(
        id=99,
        uid=str(uuid.uuid4()),
        channel=channel,
        recipient=recipient,
        user_id=None,
        category=None,
        template=None,
        subject="Hello",
        body="Body text",
        html_body="<p>Body</p>" if channel == "email" else None,
        locale=None,
        payload={},
        priority=0,
        attempt=attempt,
        max_attempts=attempt,  # the last attempt: failures log at ERROR, the loudest path
        created_at=now,
        claimed_at=now,
    )


def assert_retryable(
    outcome: Outcome, code: str, *, trip: bool = False, throttled: bool = False
) -> Retryable:
    """The outcome is Retryable with this code, trip and throttled."""
    assert isinstance(outcome, Retryable), outcome
    assert (outcome.code, outcome.trip, outcome.throttled) == (code, trip, throttled), outcome
    return outcome


def assert_no_canary(
    caplog: pytest.LogCaptureFixture, shown: list[object], canaries: list[str]
) -> None:
    assert caplog.records, "the failures were not logged at all"
    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.extend(repr(value) for value in vars(record).values())
    for item in shown:
        texts.extend((str(item), repr(item)))
    everything = "\n".join(texts)
    for canary in canaries:
        assert canary not in everything


def encodings(login: str, secret: str) -> list[str]:
    """The secret, and the encodings a wire protocol might carry it in."""
    return [
        secret,
        base64.b64encode(f"{login}:{secret}".encode()).decode(),
        base64.b64encode(f"\0{login}\0{secret}".encode()).decode(),
        base64.b64encode(secret.encode()).decode(),
    ]
