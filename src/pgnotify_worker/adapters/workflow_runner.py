"""Workflow runs: one replica at a time evaluates each due run, in one short transaction.

A run's state is its row (current_step, next_at) and the rows of the steps it did; nothing of it
lives in this process. A run is claimed with FOR UPDATE SKIP LOCKED, advanced through as many
steps as it can take now (sends are INSERTs of notifications in the same transaction, under a key
made of the run id and the step), and left with its next step and next_at, or finished. A worker
that dies mid-evaluation rolls the whole of it back: another takes the run up from its last
committed step, and nothing it had sent can be sent again (same transaction, same key)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg

from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.db import DB_ERRORS
from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.core.workflows import (
    DefinitionError,
    Finish,
    Go,
    Recheck,
    SendNow,
    Step,
    StepFacts,
    Wait,
    Workflow,
    batch_scope,
    decide,
    parse,
    payload_for,
    preference_key,
    send_key,
)
from pgnotify_worker.models import Wake, WakeWorkflows
from pgnotify_worker.ports import WorkflowMetrics

log = logging.getLogger(__name__)
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
REFUSED = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)  # the row's fault


@dataclass
class WorkflowRunner:
    """Evaluates due workflow runs until cancelled; wakes on NOTIFY 'workflows', polls anyway."""

    pool: asyncpg.Pool
    worker_id: str
    poll_interval: float = 5.0
    recheck_interval: float = 15.0
    batch: int = 20  # runs per transaction
    metrics: WorkflowMetrics | None = None
    _wake: anyio.Event = field(default_factory=anyio.Event)
    # what each open transaction (by its connection) did, reported once it commits:
    # ("started", ""), ("finished", outcome), (kind, outcome) of a step
    _done: dict[int, list[tuple[str, str]]] = field(default_factory=dict)

    def on_wake(self, wake: Wake) -> None:
        """A NOTIFY arrived (called by the listener beside the delivery worker's own)."""
        if isinstance(wake, WakeWorkflows):
            self._wake.set()

    def on_listener_connect(self) -> None:
        """NOTIFYs may have been missed while the listener was away: look now."""
        self._wake.set()

    async def run_due(self, at: dt.datetime | None = None, limit: int | None = None) -> int:
        """Evaluate up to `limit` (default: batch) of the most overdue runs in one transaction,
        each in a savepoint of its own; how many. `at` stands in for the database clock (tests
        of a delay until a local time). One commit for the batch: the commit's flush, not the
        evaluation, is what a run costs on a durable database."""
        async with self.pool.acquire() as conn:
            done = self._done[id(conn)] = []
            try:
                async with conn.transaction():
                    runs = await self._run_due(conn, at, limit)
            finally:
                del self._done[id(conn)]
        self._report(done)
        return len(runs)

    async def _run_due(
        self, conn: Conn, at: dt.datetime | None, limit: int | None
    ) -> list[asyncpg.Record]:
        done = self._done[id(conn)]
        runs: list[asyncpg.Record] = await conn.fetch(queries.WF_CLAIM, at, limit or self.batch)
        for run in runs:
            if run["evaluations"] == 0:
                done.append(("started", ""))
            kept = len(done)
            try:
                async with conn.transaction():  # a savepoint: a run that breaks fails alone
                    await self._evaluate(conn, run)
            except DB_ERRORS:
                raise  # the database or the connection: the whole batch is tried again
            except Exception as exc:  # a bug: never evaluate this run again and again
                del done[kept:]  # its savepoint was rolled back
                log.exception(
                    "workflow run %s cannot be evaluated",
                    run["id"],
                    extra={"action": "workflow_failed"},
                )
                reason = f"cannot evaluate: {type(exc).__name__}: {exc}"[:500]
                await conn.execute(
                    queries.WF_MOVE,
                    run["id"],
                    run["current_step"],
                    run["db_now"],
                    "failed",
                    reason,
                    None,
                )
                done.append(("finished", "failed"))
        return runs

    def _note(self, conn: Conn, what: str, outcome: str) -> None:
        """Remember what the open transaction did (counted once it commits)."""
        self._done[id(conn)].append((what, outcome))

    def _report(self, done: list[tuple[str, str]]) -> None:
        """Count what a committed transaction did (a rolled back one counts nothing)."""
        if self.metrics is None:
            return
        for what, outcome in done:
            if what == "started":
                self.metrics.workflow_run_started()
            elif what == "finished":
                self.metrics.workflow_run_finished(outcome)
            else:
                self.metrics.workflow_step(what, outcome)

    async def run_one(self, at: dt.datetime | None = None) -> bool:
        """Evaluate the most overdue run, if any; False when none is due."""
        return await self.run_due(at, 1) > 0

    async def _evaluate(self, conn: Conn, run: asyncpg.Record) -> None:
        run_id: int = run["id"]
        now: dt.datetime = run["db_now"]
        current: str | None = run["current_step"]
        try:
            workflow = parse(run["workflow"], run["version"], run["category"], run["steps"] or [])
        except DefinitionError as exc:
            await self._finish(conn, run_id, current, now, "failed", f"cannot run: {exc}")
            return
        facts = {
            row["step"]: StepFacts(
                row["outcome"],
                row["status"],
                row["channel"],
                row["read"],
                frozenset(row["events"]),
            )
            for row in await conn.fetch(queries.WF_FACTS, run_id)
        }
        preferences = await self._preferences(conn, workflow, run["user_id"])
        try:
            await self._advance(conn, run, workflow, current, facts, preferences)
        except DefinitionError as exc:  # a run INSERTed at a step its version does not have
            await self._finish(conn, run_id, current, now, "failed", f"cannot run: {exc}")

    async def _advance(
        self,
        conn: Conn,
        run: asyncpg.Record,
        workflow: Workflow,
        current: str | None,
        facts: dict[str, StepFacts],
        preferences: dict[tuple[str, str | None], str],
    ) -> None:
        """Take every step the run can take now; leave it waiting or finished."""
        run_id: int = run["id"]
        now: dt.datetime = run["db_now"]
        for _ in range(len(workflow.steps) + 1):
            decision = decide(
                workflow,
                current,
                facts,
                preferences,
                now,
                run["timezone"],
                self.recheck_interval,
            )
            match decision:
                case SendNow(step=step, next_step=following):
                    facts[step.name], closes = await self._send(conn, run, workflow, step)
                    if closes is not None:  # folded: go on when its window's notification goes
                        await conn.execute(
                            queries.WF_MOVE, run_id, following, closes, "running", None, "send"
                        )
                        log.info(
                            "workflow run %s step %s is batched until %s",
                            run_id,
                            step.name,
                            closes.isoformat(),
                            extra={"action": "workflow_batched"},
                        )
                        return
                    current = following
                case Go(step=step, result=result, next_step=following, reason=reason):
                    assert step.check is not None
                    outcome = str(result).lower()
                    await self._record(conn, run_id, step, outcome, step.check.describe(), None)
                    if following is None:
                        why = reason or "all steps done"
                        stopped = reason is not None  # the condition went to "stop"
                        await self._finish(
                            conn, run_id, None, now, "completed", why, stopped=stopped
                        )
                        return
                    current = following
                case Wait(step=step, until=until, next_step=following):
                    detail = f"until {until:%Y-%m-%d %H:%M:%S} UTC"
                    await self._record(conn, run_id, step, "waiting", detail, None)
                    await conn.execute(
                        queries.WF_MOVE, run_id, following, until, "running", None, "delay"
                    )
                    log.info(
                        "workflow run %s waits at step %s %s",
                        run_id,
                        step.name,
                        detail,
                        extra={"action": "workflow_waiting"},
                    )
                    return
                case Recheck(step=step, at=again):
                    await conn.execute(
                        queries.WF_MOVE, run_id, step.name, again, "running", None, "send"
                    )
                    return
                case Finish(status="cancelled", reason=reason):
                    await conn.execute(queries.WF_CANCEL, run_id, reason)
                    self._note(conn, "finished", "cancelled")
                    log.info(
                        "workflow run %s %s", run_id, reason, extra={"action": "workflow_cancelled"}
                    )
                    return
                case Finish(status=status, reason=reason, step=step):
                    if step is not None:
                        await self._record(conn, run_id, step, "stopped", reason, None)
                    await self._finish(
                        conn, run_id, None, now, status, reason, stopped=step is not None
                    )
                    return
        await self._finish(conn, run_id, current, now, "failed", "cannot run: no progress")

    async def _finish(
        self,
        conn: Conn,
        run_id: int,
        current: str | None,
        now: dt.datetime,
        status: str,
        reason: str,
        *,
        stopped: bool = False,
    ) -> None:
        await conn.execute(queries.WF_MOVE, run_id, current, now, status, reason, None)
        self._note(conn, "finished", "stopped" if stopped else status)
        level = logging.WARNING if status == "failed" else logging.INFO
        log.log(
            level,
            "workflow run %s %s: %s",
            run_id,
            status,
            reason,
            extra={"action": f"workflow_{status}"},
        )

    async def _preferences(
        self, conn: Conn, workflow: Workflow, user_id: str
    ) -> dict[tuple[str, str | None], str]:
        """The settings the workflow's preference conditions read (the user's, now)."""
        wanted = {
            preference_key(step.check, workflow)
            for step in workflow.steps
            if step.check is not None and step.check.preference is not None
        }
        return {
            key: await conn.fetchval(queries.WF_PREFERENCE, user_id, key[0], key[1])
            for key in wanted
        }

    async def _send(
        self, conn: Conn, run: asyncpg.Record, workflow: Workflow, step: Step
    ) -> tuple[StepFacts, dt.datetime | None]:
        """Make the step's notification; what it led to (created, unreachable or refused), and,
        for a send folded into the step's batching window, when that window closes."""
        run_id: int = run["id"]
        key = send_key(run_id, step.name)
        payload: dict[str, Any] = payload_for(step, run["payload"] or {})
        try:
            async with conn.transaction():  # a savepoint: a refused row fails this step only
                made = await conn.fetchrow(
                    queries.WF_SEND,
                    key,
                    run["user_id"],
                    step.channel,
                    step.category or workflow.category,
                    step.template,
                    step.subject,
                    step.body,
                    step.html_body,
                    payload,
                    step.priority,
                )
                if made is None:
                    made = await conn.fetchrow(queries.WF_SENT_BEFORE, key)
        except REFUSED as exc:
            reason = f"refused: {exc}"[:500]
            await self._record(conn, run_id, step, "refused", reason, None)
            log.warning(
                "workflow run %s step %s: %s",
                run_id,
                step.name,
                reason,
                extra={"action": "workflow_send_refused"},
            )
            return StepFacts("refused", channel=step.channel), None
        if made is None:
            why = f"the user has no {step.channel} address"
            await self._record(conn, run_id, step, "unreachable", why, None)
            return StepFacts("unreachable", channel=step.channel), None
        closes: dt.datetime | None = None
        detail: str | None = None
        if step.batch is not None:
            value = step.batch.key_of(payload)
            if value is None:
                detail = f"not batched: the payload has no {step.batch.describe_key()}"
            else:
                closes = await conn.fetchval(
                    queries.WF_FOLD,
                    made["id"],
                    batch_scope(workflow, step),
                    value,
                    step.batch.window,
                    step.batch.items,
                )
                if closes is not None:
                    detail = f"batched until {closes:%Y-%m-%d %H:%M:%S} UTC"
        await self._record(conn, run_id, step, "created", detail, made["id"])
        log.info(
            "workflow run %s step %s: notification %s",
            run_id,
            step.name,
            made["id"],
            extra={"action": "workflow_send"},
        )
        return StepFacts("created", "held" if closes else made["status"], step.channel), closes

    async def _record(
        self,
        conn: Conn,
        run_id: int,
        step: Step,
        outcome: str,
        detail: str | None,
        notification_id: int | None,
    ) -> None:
        result = await conn.execute(
            queries.WF_RECORD,
            run_id,
            step.name,
            step.kind,
            outcome,
            detail,
            notification_id,
            self.worker_id,
        )
        if result != "INSERT 0 0":  # recorded before (a repeat after a crash): counted then
            self._note(conn, step.kind, outcome)

    async def run(self) -> None:
        """Until cancelled: evaluate what is due, then sleep until the next due run, a NOTIFY
        or the poll interval, whichever comes first."""
        backoff = Backoff(1.0, 30.0)
        while True:
            wait = self.poll_interval
            try:
                while await self.run_due() == self.batch:
                    pass
                async with self.pool.acquire() as conn:
                    due = await conn.fetchval(queries.WF_NEXT_DUE)
                if due is not None:
                    wait = min(wait, max(due, 0.05))
                backoff.reset()
            except DB_ERRORS as exc:
                log.warning(
                    "workflows: %s", type(exc).__name__, extra={"action": "workflows_failed"}
                )
                wait = backoff.next()
            except Exception:  # a bug must not stop the delivery worker beside it: log, back off
                log.exception("workflows: evaluation failed", extra={"action": "workflows_error"})
                wait = backoff.next()
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()
