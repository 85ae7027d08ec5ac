"""Cron schedules (five fields, in a time zone) to the next run time. Pure: `after` is passed in."""

from __future__ import annotations

import datetime as dt
import zoneinfo

from cronsim import CronSim, CronSimError

from pgnotify_worker.errors import ScheduleError


def next_run(schedule: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first time strictly after `after` that matches `schedule` in `timezone` (UTC result)."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {timezone!r}") from None
    try:
        found = next(CronSim(schedule, after.astimezone(zone)))
    except (CronSimError, StopIteration) as exc:
        raise ScheduleError(f"bad cron schedule {schedule!r}: {exc}") from None
    return found.astimezone(dt.UTC)
