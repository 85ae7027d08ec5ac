"""What to do with a notification at send time, from the facts about its recipient. Pure.

Order of the rules: an expired row is never sent; a suppressed address is never sent to (not
even critical ones); a critical category ignores everything else; then a global unsubscribe,
missing consent and an 'off' preference skip; 'daily'/'weekly' hold the row for a digest; quiet
hours defer it to the end of the window."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the rules need, read from the database at send time."""

    expired: bool = False
    suppressed: bool = False
    critical: bool = False
    unsubscribed: bool = False
    requires_consent: bool = False
    consent: bool | None = None  # None: never recorded
    preference: str = "immediate"  # immediate | daily | weekly | off
    is_digest: bool = False
    quiet_start: dt.time | None = None
    quiet_end: dt.time | None = None
    local_time: dt.time | None = None  # the recipient's wall-clock time now (database clock)


@dataclass(frozen=True, slots=True)
class Send:
    """Go ahead. critical: the category ignores opt-outs, so no unsubscribe link is offered."""

    critical: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    """Not sent, and never will be; the reason goes into the event."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Expire:
    """Past its expires_at: not sent."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Kept for the next daily or weekly digest, or folded into a batch (kind 'batch')."""

    kind: str


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now: try again in `seconds` (quiet hours end, or the next throttle window opens)."""

    seconds: float
    code: str = "quiet_hours"


Decision = Send | Skip | Expire | Hold | Defer


def in_window(now: dt.time, start: dt.time, end: dt.time) -> bool:
    """Is `now` in [start, end)? A window may wrap midnight (22:00-07:00)."""
    if start == end:
        return False
    if start < end:
        return start <= now < end
    return now >= start or now < end


def seconds_until(now: dt.time, then: dt.time) -> float:
    """Seconds from `now` until the next `then` (wall clock, within 24 h)."""
    day = 24 * 3600
    a = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    b = then.hour * 3600 + then.minute * 60 + then.second + then.microsecond / 1e6
    return (b - a) % day or day


def decide(facts: Facts) -> Decision:
    """The rules, in order."""
    if facts.expired:
        return Expire()
    if facts.suppressed:
        return Skip("suppressed", "the address is on the suppression list")
    if facts.critical:
        return Send(critical=True)
    if facts.unsubscribed:
        return Skip("unsubscribed", "the user unsubscribed from all notifications")
    if facts.requires_consent and facts.consent is not True:
        return Skip("no_consent", "the category needs an opt-in the user has not given")
    preference = facts.preference
    if preference == "off":
        return Skip("preference_off", "the user turned this category off for this channel")
    if preference in ("daily", "weekly") and not facts.is_digest:
        return Hold(preference)
    if preference not in ("immediate", "daily", "weekly"):
        raise ValueError(f"unknown preference {preference!r}")
    start, end, now = facts.quiet_start, facts.quiet_end, facts.local_time
    if start is not None and end is not None and now is not None and in_window(now, start, end):
        return Defer(seconds_until(now, end))
    return Send()
