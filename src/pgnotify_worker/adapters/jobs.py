"""Periodic jobs: rows of pgnotify.jobs with a cron schedule; one replica runs each due run."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg

from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.db import DB_ERRORS
from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.core.cron import next_run
from pgnotify_worker.errors import ScheduleError

log = logging.getLogger(__name__)
ALERT_AFTER = 3  # failed runs in a row


@dataclass
class JobRunner:
    """Runs due jobs until cancelled. The command runs outside any transaction, so a procedure
    can commit per batch (retention); a statement timeout bounds it."""

    pool: asyncpg.Pool
    worker_id: str
    builtin_commands: dict[str, str] = field(default_factory=dict)
    alert: Callable[[str, int, str | None], Awaitable[None]] | None = None
    on_finish: Callable[[str, str, int], None] = lambda _job, _status, _streak: None
    idle_poll: float = 30.0
    scrub: Callable[[str], str] = lambda text: text  # a failed run's error, before it is kept

    async def sync(self) -> None:
        """Built-in commands follow the settings; new jobs get their first run time."""
        async with self.pool.acquire() as conn:
            for name, command in self.builtin_commands.items():
                await conn.execute(queries.JOB_COMMAND, name, command)
            for job in await conn.fetch(queries.JOBS_UNSCHEDULED):
                try:
                    first = next_run(job["schedule"], job["timezone"], job["db_now"])
                except ScheduleError as exc:
                    log.error("job %s disabled: %s", job["name"], exc, extra={"action": "job_bad"})
                    await conn.execute(queries.JOB_DISABLE, job["name"], f"disabled: {exc}")
                    continue
                await conn.execute(queries.JOB_SCHEDULE, job["name"], first)

    async def run_one(self) -> bool:
        """Run the most overdue job, if any; False when none is due."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                job = await conn.fetchrow(queries.JOB_CLAIM)
                if job is None:
                    return False
                try:
                    upcoming = next_run(job["schedule"], job["timezone"], job["db_now"])
                except ScheduleError as exc:
                    await conn.execute(queries.JOB_DISABLE, job["name"], f"disabled: {exc}")
                    return True
                run_id: int = await conn.fetchval(
                    queries.JOB_START, job["name"], upcoming, job["next_run_at"], self.worker_id
                )
            status, rows, error = await self._execute(conn, job["command"], job["timeout_seconds"])
            error = self.scrub(error) if error is not None else None
            finished = await conn.fetchrow(queries.JOB_FINISH, run_id, status, rows, error)
        streak = finished["consecutive_failures"] if finished else 0
        self.on_finish(job["name"], status, streak)
        level = logging.INFO if status == "succeeded" else logging.ERROR
        log.log(
            level,
            "job %s %s%s",
            job["name"],
            status,
            f": {error}" if error else f" ({rows} rows)" if rows is not None else "",
            extra={"action": f"job_{status}", "count": rows},
        )
        if status == "failed" and streak == ALERT_AFTER and self.alert is not None:
            await self.alert(job["name"], streak, error)
        return True

    @staticmethod
    async def _execute(
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, command: str, limit: int
    ) -> tuple[str, int | None, str | None]:
        """Run one job command; (status, rows affected, error).

        A statement runs in its own transaction with a transaction-local statement_timeout (safe
        behind a transaction pooler). A procedure (CALL) commits per batch, so it cannot run
        inside a transaction: it gets no timeout of ours and bounds itself by its batches."""
        try:
            if command.lstrip()[:4].lower() == "call":
                tag = await conn.execute(command)
                return "succeeded", _rows(tag), None
            async with conn.transaction():
                await conn.execute(queries.STATEMENT_TIMEOUT, f"{limit}s")
                if command.lstrip()[:6].lower() == "select":
                    value: Any = await conn.fetchval(command)
                    is_count = isinstance(value, int) and not isinstance(value, bool)
                    return "succeeded", value if is_count else None, None
                return "succeeded", _rows(await conn.execute(command)), None
        except asyncpg.PostgresError as exc:
            return "failed", None, f"{exc.sqlstate}: {exc}"[:1000]

    async def run(self) -> None:
        """Until cancelled: run what is due, otherwise sleep until the next due time."""
        backoff = Backoff(1.0, 30.0)
        while True:
            wait = self.idle_poll
            try:
                await self.sync()
                while await self.run_one():
                    pass
                async with self.pool.acquire() as conn:
                    due = await conn.fetchval(queries.JOBS_NEXT_DUE)
                if due is not None:
                    wait = min(wait, max(due, 0.05))
                backoff.reset()
            except DB_ERRORS as exc:
                log.warning("jobs: %s", type(exc).__name__, extra={"action": "jobs_failed"})
                wait = backoff.next()
            await anyio.sleep(wait)

    async def status(self) -> list[dict[str, Any]]:
        """Each job's schedule and last run, for /status."""
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(queries.JOBS_STATUS)]


def _rows(tag: str) -> int | None:
    """Rows affected from a command tag such as 'UPDATE 5' (None for 'CALL', 'REFRESH ...')."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None
