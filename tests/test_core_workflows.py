"""Workflow definitions and decisions, without a database (core/workflows.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pgnotify_worker.core.workflows import (
    Batch,
    Check,
    DefinitionError,
    Finish,
    Go,
    Recheck,
    SendNow,
    StepFacts,
    Wait,
    decide,
    next_local,
    outcome_of,
    parse,
    payload_for,
    send_key,
)

UTC = dt.UTC
NOW = dt.datetime(2026, 3, 7, 15, 0, tzinfo=UTC)
FALLBACK: list[dict[str, Any]] = [
    {"name": "inapp", "kind": "send", "channel": "inapp", "template": "comment"},
    {"name": "wait", "kind": "delay", "minutes": 10},
    {"name": "unread", "kind": "condition", "step": "inapp", "is": "read", "then": "stop"},
    {
        "name": "email",
        "kind": "send",
        "channel": "email",
        "template": "comment",
        "cancel_if": {"step": "inapp", "is": "read"},
    },
    {"name": "bounced", "kind": "condition", "step": "email", "is": "failed", "else": "stop"},
    {"name": "sms", "kind": "send", "channel": "sms", "body": "New comment: {{ text }}"},
]
FLOW = parse("fallback", 1, "comments", FALLBACK)


def run(current: str | None, facts: dict[str, StepFacts] | None = None, **kw: Any) -> Any:
    return decide(
        FLOW,
        current,
        facts or {},
        kw.get("preferences", {}),
        kw.get("now", NOW),
        kw.get("zone", "UTC"),
        30.0,
    )


# --- each step kind -------------------------------------------------------------------------------


def test_a_send_step_sends_and_goes_on_with_the_next_step() -> None:
    decision = run("inapp")
    assert isinstance(decision, SendNow)
    assert (decision.step.channel, decision.step.template, decision.next_step) == (
        "inapp",
        "comment",
        "wait",
    )


def test_a_fixed_delay_waits_from_the_database_now() -> None:
    decision = run("wait")
    assert decision == Wait(FLOW.step("wait"), NOW + dt.timedelta(minutes=10), "unread")


def test_delay_units_add_up() -> None:
    flow = parse("x", 1, None, [{"kind": "delay", "hours": 1, "minutes": 30, "seconds": 5}])
    decision = decide(flow, "step1", {}, {}, NOW, "UTC", 30)
    assert isinstance(decision, Wait) and decision.until == NOW + dt.timedelta(seconds=5405)
    assert decision.next_step is None  # the last step: the run completes after it


def test_a_stop_step_completes_the_run_with_its_reason() -> None:
    flow = parse("x", 1, None, [{"kind": "stop", "reason": "nothing to do"}])
    assert decide(flow, "step1", {}, {}, NOW, "UTC", 30) == Finish(
        "completed", "nothing to do", flow.steps[0]
    )


def test_past_the_last_step_the_run_completes() -> None:
    assert run(None) == Finish("completed", "all steps done")


# --- conditions on an earlier step ----------------------------------------------------------------

SENT_INAPP = StepFacts("created", "sent", "inapp")


def test_unread_in_app_goes_on_to_the_email() -> None:
    decision = run("unread", {"inapp": SENT_INAPP})
    assert decision == Go(FLOW.step("unread"), False, "email")


def test_read_in_app_stops_the_run_with_why() -> None:
    decision = run("unread", {"inapp": StepFacts("created", "sent", "inapp", read=True)})
    assert isinstance(decision, Go) and decision.result is True and decision.next_step is None
    assert decision.reason == "stopped: condition 'unread' was true (step 'inapp' is read)"


def test_a_failure_condition_waits_while_the_email_is_on_its_way() -> None:
    for status in ("queued", "scheduled", "processing", "held"):
        decision = run("bounced", {"email": StepFacts("created", status, "email")})
        assert decision == Recheck(FLOW.step("bounced"), NOW + dt.timedelta(seconds=30))


@pytest.mark.parametrize(
    ("facts", "goes_to"),
    [
        (StepFacts("created", "failed", "email"), "sms"),
        (StepFacts("created", "dead", "email"), "sms"),
        (StepFacts("created", "sent", "email", events=frozenset({"bounced"})), "sms"),
        (StepFacts("unreachable", channel="email"), "sms"),  # no email address at all
        (StepFacts("refused", channel="email"), "sms"),
        (StepFacts("created", "sent", "email"), None),
        (StepFacts("created", "sent", "email", events=frozenset({"delivered"})), None),
        (StepFacts("created", "skipped", "email"), None),  # the user turned email off
    ],
)
def test_a_permanently_failed_email_falls_back_to_sms(
    facts: StepFacts, goes_to: str | None
) -> None:
    decision = run("bounced", {"email": facts})
    assert isinstance(decision, Go) and decision.next_step == goes_to


@pytest.mark.parametrize(
    ("is_", "facts", "expected"),
    [
        ("sent", StepFacts("created", "sent", "email"), True),
        ("sent", StepFacts("created", "digested", "email"), True),
        ("sent", StepFacts("created", "failed", "email"), False),
        ("sent", StepFacts("created", "queued", "email"), None),
        ("delivered", StepFacts("created", "sent", "email"), False),
        ("delivered", StepFacts("created", "sent", "email", events=frozenset({"delivered"})), True),
        ("delivered", StepFacts("created", "sent", "inapp"), True),  # in the inbox
        ("read", StepFacts("created", "queued", "inapp"), False),  # so far
        ("read", StepFacts("created", "sent", "inapp", read=True), True),
        ("seen", StepFacts("created", "sent", "inapp", read=True), True),
        ("clicked", StepFacts("created", "sent", "email"), False),
        ("clicked", StepFacts("created", "sent", "email", events=frozenset({"clicked"})), True),
        ("failed", StepFacts("created", "sent", "email"), False),
        (
            "failed",
            StepFacts("created", "sent", "sms", events=frozenset({"delivery_failed"})),
            True,
        ),
        ("bounced", StepFacts("created", "sent", "email", events=frozenset({"bounced"})), True),
        ("bounced", StepFacts("created", "failed", "email"), False),
        ("skipped", StepFacts("created", "skipped", "email"), True),
        ("skipped", StepFacts("created", "expired", "email"), True),
        ("skipped", StepFacts("created", "sent", "email"), False),
        ("skipped", None, True),  # a branch never ran the step
        ("sent", None, False),
    ],
)
def test_each_condition_on_an_earlier_step(
    is_: str, facts: StepFacts | None, expected: bool | None
) -> None:
    assert outcome_of(Check(is_, step="s"), facts) is expected


@pytest.mark.parametrize(
    ("is_", "setting", "expected"),
    [
        ("on", "immediate", True),
        ("on", "daily", True),
        ("on", "off", False),
        ("off", "off", True),
        ("off", "weekly", False),
        ("daily", "daily", True),
        ("immediate", "daily", False),
    ],
)
def test_a_condition_on_the_recipients_preference(is_: str, setting: str, expected: bool) -> None:
    flow = parse(
        "x",
        1,
        "comments",
        [
            {"name": "c", "kind": "condition", "preference": "email", "is": is_, "then": "stop"},
            {"name": "e", "kind": "send", "channel": "email", "template": "t"},
        ],
    )
    decision = decide(flow, "c", {}, {("email", "comments"): setting}, NOW, "UTC", 30)
    assert isinstance(decision, Go) and decision.result is expected


def test_cancel_if_stops_the_run_before_its_step() -> None:
    read = StepFacts("created", "sent", "inapp", read=True)
    decision = run("email", {"inapp": read})
    assert decision == Finish(
        "cancelled", "cancelled before step 'email': step 'inapp' is read", FLOW.step("email")
    )
    assert isinstance(run("email", {"inapp": SENT_INAPP}), SendNow)


def test_a_send_carries_the_run_payload_under_the_steps_overrides_and_a_stable_key() -> None:
    flow = parse(
        "x",
        1,
        None,
        [{"kind": "send", "channel": "webhook", "overrides": {"kind": "reminder", "n": 2}}],
    )
    assert payload_for(flow.steps[0], {"n": 1, "doc": "a"}) == {
        "n": 2,
        "doc": "a",
        "kind": "reminder",
    }
    assert send_key(42, "email") == send_key(42, "email") == "workflow:42:email"


# --- delay until a local time, across DST ---------------------------------------------------------


def test_until_nine_local_keeps_nine_across_the_spring_forward() -> None:
    # New York springs forward on 2026-03-08 at 02:00 (EST -5 -> EDT -4)
    saturday_ten = dt.datetime(2026, 3, 7, 15, 0, tzinfo=UTC)  # 10:00 EST
    until = next_local(saturday_ten, "America/New_York", dt.time(9, 0))
    assert until == dt.datetime(2026, 3, 8, 13, 0, tzinfo=UTC)  # 09:00 EDT, 23 h later
    assert until - saturday_ten == dt.timedelta(hours=22)


def test_until_nine_local_keeps_nine_across_the_fall_back() -> None:
    # Paris falls back on 2026-10-25 at 03:00 (CEST +2 -> CET +1)
    saturday_ten = dt.datetime(2026, 10, 24, 8, 0, tzinfo=UTC)  # 10:00 CEST
    until = next_local(saturday_ten, "Europe/Paris", dt.time(9, 0))
    assert until == dt.datetime(2026, 10, 25, 8, 0, tzinfo=UTC)  # 09:00 CET, 24 h later


def test_until_a_time_later_today_is_today_and_now_itself_is_tomorrow() -> None:
    morning = dt.datetime(2026, 6, 1, 6, 0, tzinfo=UTC)  # 08:00 in Paris
    assert next_local(morning, "Europe/Paris", dt.time(9, 0)) == morning + dt.timedelta(hours=1)
    nine = dt.datetime(2026, 6, 1, 7, 0, tzinfo=UTC)  # 09:00 in Paris exactly
    assert next_local(nine, "Europe/Paris", dt.time(9, 0)) == nine + dt.timedelta(days=1)


def test_a_wall_clock_time_the_change_skips_moves_on_by_the_gap() -> None:
    before = dt.datetime(2026, 3, 8, 5, 0, tzinfo=UTC)  # 00:00 EST on the change day
    until = next_local(before, "America/New_York", dt.time(2, 30))  # 02:30 does not exist
    assert until == dt.datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 03:30 EDT


def test_an_unknown_zone_counts_as_utc() -> None:
    assert next_local(NOW, "Mars/Olympus", dt.time(16, 0)) == NOW + dt.timedelta(hours=1)


def test_a_delay_until_uses_the_recipients_zone() -> None:
    flow = parse("x", 1, None, [{"name": "d", "kind": "delay", "until": "09:00"}])
    decision = decide(flow, "d", {}, {}, NOW, "America/New_York", 30)
    assert isinstance(decision, Wait)
    assert decision.until == dt.datetime(2026, 3, 8, 13, 0, tzinfo=UTC)


# --- definitions refused --------------------------------------------------------------------------

SMS = {"name": "s", "kind": "send", "channel": "sms", "body": "x"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "has no steps"),
        ([{"kind": "sned"}], "unknown step kind 'sned'"),
        ([{"kind": "send", "channel": "fax", "body": "x"}], "unknown channel 'fax'"),
        ([{"kind": "send", "channel": "sms", "body": "x", "than": "y"}], "has no setting than"),
        ([{"kind": "delay"}], "must wait more than 0 seconds"),
        ([{"kind": "delay", "until": "9am"}], "must be one local time HH:MM"),
        ([{"kind": "delay", "minutes": -5}], "must be a number, not negative"),
        (
            [{"name": "c", "kind": "condition", "step": "s", "is": "sent"}, SMS],
            "refers to step 's', which comes later",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "nope", "is": "sent"}],
            "refers to unknown step 'nope'",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "s", "is": "opened"}],
            "unknown condition 'opened'",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "s", "is": "read"}],
            "'read' needs an in-app step",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "s", "is": "sent", "then": "s"}],
            "goes back to step 's', which would make a cycle",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "s", "is": "sent", "else": "c"}],
            "which would make a cycle",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "s", "is": "sent", "then": "x"}],
            "then goes to unknown step 'x'",
        ),
        (
            [{"name": "d", "kind": "delay", "minutes": 1}, {**SMS, "name": "d"}],
            "two steps named 'd'",
        ),
        (
            [
                {"name": "d", "kind": "delay", "minutes": 1},
                {"kind": "condition", "step": "d", "is": "sent"},
            ],
            "a delay step",
        ),
        ([{"kind": "condition", "preference": "fax", "is": "on"}], "unknown channel 'fax'"),
        ([{"kind": "stop", "name": "next"}], "bad name 'next'"),
    ],
)
def test_bad_definitions_are_refused_with_the_problem_named(
    steps: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(DefinitionError, match=message.replace("(", r"\(")):
        parse("bad", 1, None, steps)


def batched(batch: Any) -> Batch | None:
    step = {"kind": "send", "channel": "email", "body": "x", "batch": batch}
    return parse("w", 1, None, [step]).steps[0].batch


@pytest.mark.parametrize(
    ("batch", "window", "key", "items"),
    [
        ({"window": "15 minutes"}, 900.0, None, 10),
        ({"window": "1 second", "key": "thread_id", "items": 1}, 1.0, ("thread_id",), 1),
        ({"window": "7 days", "key": "{{ payload.doc.id }}"}, 604800.0, ("doc", "id"), 10),
        ({"window": " 2 hour ", "key": "payload.t", "items": 100}, 7200.0, ("t",), 100),
    ],
)
def test_a_send_steps_batch_is_parsed(
    batch: dict[str, Any], window: float, key: tuple[str, ...] | None, items: int
) -> None:
    assert batched(batch) == Batch(window, key, items)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ("15 minutes", "must be an object"),
        ({"window": "15 minutes", "size": 2}, "has no setting size"),
        ({"window": "0 seconds"}, "from 1 second to 7 days"),
        ({"window": "8 days"}, "from 1 second to 7 days"),
        ({"window": 900}, "from 1 second to 7 days"),
        ({"window": "1 minute", "key": "{{ payload.t"}, "must name a payload field"),
        ({"window": "1 minute", "key": "a b"}, "must name a payload field"),
        ({"window": "1 minute", "items": 101}, "an integer from 1 to 100"),
        ({"window": "1 minute", "items": True}, "an integer from 1 to 100"),
    ],
)
def test_a_bad_batch_is_refused_with_the_problem_named(batch: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        batched(batch)


def test_the_batch_key_is_read_from_the_payload() -> None:
    batch = Batch(60.0, ("thread", "id"))
    assert batch.key_of({"thread": {"id": 7}}) == "7"
    assert batch.key_of({"thread": {"id": "t-1"}}) == "t-1"
    assert batch.key_of({"thread": {"id": True}}) == "true"
    assert batch.key_of({"thread": {}}) is None
    assert batch.key_of({"thread": {"id": None}}) is None
    assert batch.key_of({"thread": {"id": [1]}}) is None
    assert Batch(60.0).key_of({}) == ""  # no key: one window per user and step
