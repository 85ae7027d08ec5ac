"""Throttles: at most N sends per recipient, category and channel in fixed windows. Pure.

Windows are fixed, counted from the Unix epoch (UTC): window k covers [k * length, (k + 1) *
length). The database counts the sends (pgnotify.take_throttle, the same arithmetic) so every
replica agrees; this module decides what a send over the limit becomes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pgnotify_worker.core.preferences import Decision, Defer, Hold, Send, Skip


@dataclass(frozen=True, slots=True)
class Window:
    """One throttle window, in epoch seconds: [start, end)."""

    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Take:
    """What the database answered when a send asked for its category's allowance."""

    allowed: bool
    used: int
    limit: int
    window: Window
    action: str  # drop | delay | batch
    now: float  # epoch seconds, database clock


def window_of(at: float, length: float) -> Window:
    """The window holding `at` (epoch seconds) for windows of `length` seconds."""
    if length <= 0:
        raise ValueError(f"a throttle window must be longer than 0 seconds, not {length!r}")
    k = math.floor(at / length)
    return Window(k * length, (k + 1) * length)


def describe(limit: int, length: float) -> str:
    """'3 per 1 day' and the like, for the reason of a skipped or delayed row."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if length >= size and length % size == 0:
            n = int(length // size)
            return f"{limit} per {n} {unit}{'s' if n != 1 else ''}"
    return f"{limit} per {length:g} s"


def verdict(take: Take | None) -> Decision:
    """Send while the window has room; otherwise the category's action for the extra."""
    if take is None or take.allowed:
        return Send()
    length = take.window.end - take.window.start
    limit = describe(take.limit, length)
    match take.action:
        case "drop":
            return Skip("throttled", f"the category allows {limit} to this recipient: dropped")
        case "delay":
            return Defer(max(take.window.end - take.now, 0.0), code="throttled")
        case "batch":
            return Hold("batch")
        case _:
            raise ValueError(f"unknown throttle action {take.action!r}")
