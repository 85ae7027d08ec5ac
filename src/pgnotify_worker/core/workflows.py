"""Workflows: a definition parsed and checked, and what a run does next. Pure.

A run is at one step (or past the last). `decide` looks at that step with the facts read from
the database (what earlier steps' notifications became, the user's preferences, the database's
`now`, the recipient's time zone) and returns one decision; the runner applies it and asks again
until the run waits or ends. The database checks definitions the same way when they are stored
(schema/0017_workflows.sql); this parser is the worker's own guard."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgnotify_worker.errors import PgnotifyError

CHANNELS = ("email", "sms", "push", "webhook", "inapp")
KINDS = ("send", "delay", "condition", "stop")
STEP_CHECKS = ("sent", "delivered", "read", "seen", "clicked", "failed", "bounced", "skipped")
PREFERENCE_CHECKS = ("on", "off", "immediate", "daily", "weekly")
# a notification in one of these will not change status again
SETTLED = frozenset({"sent", "failed", "dead", "cancelled", "skipped", "digested", "expired"})
# checks whose answer waits for the notification to settle; the others are "so far"
NEEDS_SETTLED = frozenset({"sent", "delivered", "failed", "bounced", "skipped"})
SETTINGS = {
    "send": {
        "subject",
        "body",
        "html_body",
        "overrides",
        "priority",
        "category",
        "cancel_if",
        "batch",
    },
    "delay": {"seconds", "minutes", "hours", "days", "until", "cancel_if"},
    "condition": {"step", "is", "preference", "category", "then", "else", "cancel_if"},
    "stop": {"reason"},
}
UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
UNTIL = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
# a send step's batch: the same rules as validate_workflow_step() in schema/0023
BATCH_SETTINGS = ("key", "window", "items")
BATCH_WINDOW = re.compile(r"\s*([0-9]{1,7})\s*(second|minute|hour|day)s?\s*")
_PATH = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
BATCH_KEY = re.compile(
    rf"\s*(?:\{{\{{\s*(?:payload\.)?({_PATH})\s*\}}\}}|(?:payload\.)?({_PATH}))\s*"
)
MAX_BATCH_WINDOW = 7 * 86400


class DefinitionError(PgnotifyError):
    """A workflow definition the worker cannot run; the message names the step and the problem."""


@dataclass(frozen=True, slots=True)
class Check:
    """A test: on an earlier send step's outcome (step + is), or on a preference."""

    is_: str
    step: str | None = None
    preference: str | None = None  # a channel
    category: str | None = None

    def describe(self) -> str:
        if self.step is not None:
            return f"step {self.step!r} is {self.is_}"
        return f"the {self.preference} preference is {self.is_}"


@dataclass(frozen=True, slots=True)
class Batch:
    """A send step's batching window: its sends for one user and key within `window` seconds of
    the first fold into one notification carrying `items` of them."""

    window: float
    key: tuple[str, ...] | None = None  # a path into the send's payload; None: one per user
    items: int = 10

    def key_of(self, payload: Mapping[str, Any]) -> str | None:
        """The key value for this payload ("" without a key); None when the payload lacks it."""
        if self.key is None:
            return ""
        value: Any = payload
        for part in self.key:
            if not isinstance(value, Mapping) or value.get(part) is None:
                return None
            value = value[part]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)[:200]
        return None

    def describe_key(self) -> str:
        return "payload." + ".".join(self.key) if self.key else "(none)"


def _batch(raw: Any, where: str) -> Batch:
    example = '{"key": "{{ payload.thread_id }}", "window": "15 minutes", "items": 10}'
    if not isinstance(raw, Mapping):
        raise DefinitionError(f"batch of {where} must be an object, e.g. {example}")
    extra = set(raw) - set(BATCH_SETTINGS)
    if extra:
        raise DefinitionError(f"batch of {where} has no setting {', '.join(sorted(extra))}")
    window = raw.get("window")
    match = BATCH_WINDOW.fullmatch(window) if isinstance(window, str) else None
    seconds = int(match[1]) * UNITS[match[2] + "s"] if match else 0
    if not 1 <= seconds <= MAX_BATCH_WINDOW:
        raise DefinitionError(
            f"window of the batch of {where} must be a time from 1 second to 7 days, "
            f'like "15 minutes", not {window!r}'
        )
    key: tuple[str, ...] | None = None
    if "key" in raw:
        found = BATCH_KEY.fullmatch(raw["key"]) if isinstance(raw["key"], str) else None
        if found is None:
            raise DefinitionError(
                f"key of the batch of {where} must name a payload field, not {raw['key']!r}"
            )
        key = tuple((found[1] or found[2]).split("."))
    items = raw.get("items", 10)
    if isinstance(items, bool) or not isinstance(items, int) or not 1 <= items <= 100:
        raise DefinitionError(f"items of the batch of {where} must be an integer from 1 to 100")
    return Batch(float(seconds), key, items)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a definition."""

    name: str
    kind: str
    channel: str | None = None
    template: str | None = None
    subject: str | None = None
    body: str | None = None
    html_body: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    category: str | None = None
    wait: float | None = None  # delay: fixed seconds
    until: dt.time | None = None  # delay: local time of day
    check: Check | None = None  # condition
    then: str = "next"  # condition: a later step, "next" or "stop"
    otherwise: str = "next"
    cancel_if: Check | None = None
    reason: str | None = None  # stop
    batch: Batch | None = None  # send: fold this step's sends in a window


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    version: int
    category: str | None
    steps: tuple[Step, ...]

    def position(self, name: str) -> int:
        for i, step in enumerate(self.steps):
            if step.name == name:
                return i
        raise DefinitionError(f"workflow {self.name!r} has no step {name!r}")

    def step(self, name: str) -> Step:
        return self.steps[self.position(name)]

    def after(self, name: str) -> str | None:
        """The step that follows `name` (None: it was the last)."""
        i = self.position(name) + 1
        return self.steps[i].name if i < len(self.steps) else None


def _check(raw: Any, where: str, *, preference_ok: bool) -> Check:
    if not isinstance(raw, Mapping):
        raise DefinitionError(f"{where} must be an object")
    is_ = raw.get("is")
    if "step" in raw and "preference" not in raw:
        if is_ not in STEP_CHECKS:
            raise DefinitionError(
                f"unknown condition {is_!r} in {where}: one of {', '.join(STEP_CHECKS)}"
            )
        return Check(is_=str(is_), step=str(raw["step"]))
    if preference_ok and "preference" in raw and "step" not in raw:
        if raw["preference"] not in CHANNELS:
            raise DefinitionError(f"unknown channel {raw['preference']!r} in {where}")
        if is_ not in PREFERENCE_CHECKS:
            raise DefinitionError(
                f"unknown preference test {is_!r} in {where}: one of {', '.join(PREFERENCE_CHECKS)}"
            )
        category = raw.get("category")
        return Check(
            is_=str(is_),
            preference=str(raw["preference"]),
            category=str(category) if category is not None else None,
        )
    raise DefinitionError(f"{where} must test either an earlier step or a preference")


def _step(raw: Mapping[str, Any], index: int) -> Step:
    name = raw.get("name") or f"step{index + 1}"
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in ("stop", "next"):
        raise DefinitionError(f"step {index + 1}: bad name {name!r}")
    kind = raw.get("kind")
    where = f"step {name!r}"
    if kind not in KINDS:
        raise DefinitionError(f"unknown step kind {kind!r} in {where}: one of {', '.join(KINDS)}")
    extra = set(raw) - {"name", "kind", "channel", "template"} - SETTINGS[kind]
    if extra:
        raise DefinitionError(f"{where} ({kind}) has no setting {', '.join(sorted(extra))}")
    cancel_if = (
        _check(raw["cancel_if"], f"cancel_if of {where}", preference_ok=False)
        if ("cancel_if" in raw)
        else None
    )
    if kind != "send" and (raw.get("channel") is not None or raw.get("template") is not None):
        raise DefinitionError(f"{where} is a {kind} step: only a send step has a channel")
    if kind == "send":
        channel = raw.get("channel")
        if channel not in CHANNELS:
            raise DefinitionError(f"unknown channel {channel!r} in {where}")
        overrides = raw.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise DefinitionError(f"overrides of {where} must be an object")
        priority = raw.get("priority", 0)
        if not isinstance(priority, int) or not -32768 <= priority <= 32767:
            raise DefinitionError(f"priority of {where} must be an integer from -32768 to 32767")
        return Step(
            name,
            kind,
            channel=channel,
            template=raw.get("template"),
            subject=raw.get("subject"),
            body=raw.get("body"),
            html_body=raw.get("html_body"),
            overrides=dict(overrides),
            priority=priority,
            category=raw.get("category"),
            cancel_if=cancel_if,
            batch=_batch(raw["batch"], where) if "batch" in raw else None,
        )
    if kind == "delay":
        if "until" in raw:
            match = UNTIL.fullmatch(str(raw["until"]))
            if match is None or set(raw) & set(UNITS):
                raise DefinitionError(f"until of {where} must be one local time HH:MM")
            until = dt.time(int(match[1]), int(match[2]))
            return Step(name, kind, until=until, cancel_if=cancel_if)
        total = 0.0
        for unit, seconds in UNITS.items():
            value = raw.get(unit, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise DefinitionError(f"{unit} of {where} must be a number, not negative")
            total += value * seconds
        if not 0 < total <= 366 * 86400:
            raise DefinitionError(f"{where} must wait more than 0 seconds and at most 366 days")
        return Step(name, kind, wait=total, cancel_if=cancel_if)
    if kind == "condition":
        return Step(
            name,
            kind,
            check=_check(raw, where, preference_ok=True),
            then=str(raw.get("then", "next")),
            otherwise=str(raw.get("else", "next")),
            cancel_if=cancel_if,
        )
    return Step(name, kind, reason=raw.get("reason"))


def parse(
    name: str, version: int, category: str | None, raw_steps: Sequence[Mapping[str, Any]]
) -> Workflow:
    """A checked Workflow, or DefinitionError naming the first problem."""
    if not raw_steps:
        raise DefinitionError(f"workflow {name!r} has no steps")
    steps = tuple(_step(raw, i) for i, raw in enumerate(raw_steps))
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in seen:
            raise DefinitionError(f"workflow {name!r} has two steps named {step.name!r}")
        seen[step.name] = i
    for i, step in enumerate(steps):
        where = f"step {step.name!r}"
        for label, check in (("condition", step.check), ("cancel_if", step.cancel_if)):
            if check is None or check.step is None:
                continue
            j = seen.get(check.step)
            if j is None:
                raise DefinitionError(f"{where}: {label} refers to unknown step {check.step!r}")
            if j >= i:
                later = "is this step" if j == i else "comes later"
                raise DefinitionError(
                    f"{where}: {label} refers to step {check.step!r}, which {later}"
                )
            if steps[j].kind != "send":
                raise DefinitionError(
                    f"{where}: {label} refers to step {check.step!r}, a {steps[j].kind} step"
                )
            if check.is_ in ("read", "seen") and steps[j].channel != "inapp":
                raise DefinitionError(f"{where}: {check.is_!r} needs an in-app step")
        if step.kind == "condition":
            for label, target in (("then", step.then), ("else", step.otherwise)):
                if target in ("next", "stop"):
                    continue
                j = seen.get(target)
                if j is None:
                    raise DefinitionError(f"{where}: {label} goes to unknown step {target!r}")
                if j <= i:
                    raise DefinitionError(
                        f"{where}: {label} goes back to step {target!r}, which would make a cycle"
                    )
    return Workflow(name, version, category, steps)


# --- facts and decisions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepFacts:
    """What an earlier send step led to, as read now."""

    outcome: str  # created | unreachable | refused
    status: str | None = None  # its notification's status
    channel: str | None = None
    read: bool = False
    events: frozenset[str] = frozenset()


def outcome_of(check: Check, facts: StepFacts | None) -> bool | None:
    """True/False, or None while the answer depends on a notification still on its way."""
    is_ = check.is_
    if facts is None:  # the step never ran (a branch skipped it): nothing was sent
        return is_ == "skipped"
    if facts.outcome != "created":  # no address, or the row was refused: it will never go
        return is_ == "failed"
    status = facts.status or ""
    if is_ in NEEDS_SETTLED and status not in SETTLED:
        return None
    match is_:
        case "sent":
            return status in ("sent", "digested")
        case "delivered":
            return "delivered" in facts.events or (facts.channel == "inapp" and status == "sent")
        case "read" | "seen":
            return facts.read
        case "clicked":
            return "clicked" in facts.events
        case "failed":
            return status in ("failed", "dead") or bool(
                facts.events & {"bounced", "delivery_failed"}
            )
        case "bounced":
            return "bounced" in facts.events
        case "skipped":
            return status in ("skipped", "cancelled", "expired")
    raise DefinitionError(f"unknown condition {is_!r}")


def preference_holds(check: Check, setting: str) -> bool:
    if check.is_ == "on":
        return setting != "off"
    return setting == check.is_


def preference_key(check: Check, workflow: Workflow) -> tuple[str, str | None]:
    """(channel, category) a preference check reads."""
    assert check.preference is not None
    return check.preference, check.category or workflow.category


def next_local(now: dt.datetime, zone: str, at: dt.time) -> dt.datetime:
    """The first `at` on the recipient's wall clock after `now` (UTC). Across a DST change the
    wall-clock time is kept (09:00 stays 09:00); a time the change skips moves on by the gap, a
    time it repeats is the first of the two. An unknown zone counts as UTC."""
    try:
        tz: dt.tzinfo = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        tz = dt.UTC
    local = now.astimezone(tz)
    for days in range(3):
        day = local.date() + dt.timedelta(days=days)
        candidate = dt.datetime.combine(day, at, tzinfo=tz).astimezone(dt.UTC)
        if candidate > now:
            return candidate
    raise AssertionError("unreachable: a wall-clock time recurs within two days")


@dataclass(frozen=True, slots=True)
class SendNow:
    """Create this send step's notification, then go on with `next_step`."""

    step: Step
    next_step: str | None


@dataclass(frozen=True, slots=True)
class Wait:
    """A delay: record it and sleep (as a row) until `until`, then go on with `next_step`."""

    step: Step
    until: dt.datetime
    next_step: str | None


@dataclass(frozen=True, slots=True)
class Go:
    """A condition decided: record the result and go on with `next_step` (None: the run ends)."""

    step: Step
    result: bool
    next_step: str | None
    reason: str | None = None  # why the run ends here, when it does


@dataclass(frozen=True, slots=True)
class Recheck:
    """A condition waits for a notification to settle: look again at `at`."""

    step: Step
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class Finish:
    """The run ends: completed or cancelled, with why."""

    status: str
    reason: str
    step: Step | None = None


Decision = SendNow | Wait | Go | Recheck | Finish


def decide(
    workflow: Workflow,
    current: str | None,
    facts: Mapping[str, StepFacts],
    preferences: Mapping[tuple[str, str | None], str],
    now: dt.datetime,
    zone: str,
    recheck_seconds: float,
) -> Decision:
    """What the run at step `current` does now."""
    if current is None:
        return Finish("completed", "all steps done")
    step = workflow.step(current)
    following = workflow.after(current)
    if step.cancel_if is not None:
        assert step.cancel_if.step is not None
        if outcome_of(step.cancel_if, facts.get(step.cancel_if.step)):
            return Finish(
                "cancelled",
                f"cancelled before step {step.name!r}: {step.cancel_if.describe()}",
                step,
            )
    match step.kind:
        case "send":
            return SendNow(step, following)
        case "delay":
            if step.until is not None:
                until = next_local(now, zone, step.until)
            else:
                assert step.wait is not None
                until = now + dt.timedelta(seconds=step.wait)
            return Wait(step, until, following)
        case "condition":
            check = step.check
            assert check is not None
            result: bool | None
            if check.step is not None:
                result = outcome_of(check, facts.get(check.step))
            else:
                setting = preferences.get(preference_key(check, workflow), "immediate")
                result = preference_holds(check, setting)
            if result is None:
                return Recheck(step, now + dt.timedelta(seconds=recheck_seconds))
            target = step.then if result else step.otherwise
            if target == "stop":
                why = f"condition {step.name!r} was {str(result).lower()} ({check.describe()})"
                return Go(step, result, None, f"stopped: {why}")
            return Go(step, result, following if target == "next" else target)
        case "stop":
            return Finish("completed", step.reason or f"stopped at step {step.name!r}", step)
    raise DefinitionError(f"unknown step kind {step.kind!r}")


def payload_for(step: Step, run_payload: Mapping[str, Any]) -> dict[str, Any]:
    """The notification's payload: the run's, with the step's overrides on top."""
    return {**run_payload, **step.overrides}


def batch_scope(workflow: Workflow, step: Step) -> str:
    """What a batched step's window is named by, beside the channel, recipient and key: sends of
    one step of one workflow fold together, never with another step's."""
    return f"workflow:{workflow.name}:{step.name}"


def send_key(run_id: int, step: str) -> str:
    """The idempotency key of a run step's notification: the same on any repeat."""
    return f"workflow:{run_id}:{step}"
