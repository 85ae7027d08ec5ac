"""Workflows against a real PostgreSQL: definitions, trigger, each step and condition, cancellation,
the runner's guarantees (a SIGKILLed worker loses nothing and sends nothing twice), the views,
and the fallback example shipped in examples/workflows/fallback.sql run end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters.workflow_runner import WorkflowRunner
from pgnotify_worker.config import Settings
from tests.fakes.resend import FakeResend
from tests.support.procs import WorkerProcess
from tests.support.replicas import replica_env
from tests.support.worker import running

ROOT = Path(__file__).resolve().parent.parent
FALLBACK_SQL = ROOT / "examples" / "workflows" / "fallback.sql"
RESEND_KEY = "re_workflow_test_key"
FINISHED = ("completed", "cancelled", "failed")


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    made = await dbmod.create_pool(dsn, min_size=1, max_size=4)
    yield made
    await made.close()


@pytest.fixture
def runner(pool: asyncpg.Pool) -> WorkflowRunner:
    return WorkflowRunner(pool, "wf-test", poll_interval=0.2, recheck_interval=30.0)


async def define(
    conn: asyncpg.Connection, name: str, steps: list[dict[str, Any]], category: str | None = None
) -> int:
    version: int = await conn.fetchval(
        "SELECT pgnotify.define_workflow($1, $2, category => $3)", name, steps, category
    )
    return version


async def trigger(
    conn: asyncpg.Connection,
    name: str,
    user: str = "ada",
    payload: dict[str, Any] | None = None,
    key: str | None = None,
) -> int:
    run_id: int = await conn.fetchval(
        "SELECT pgnotify.trigger($1, $2, $3, idempotency_key => $4)", name, user, payload or {}, key
    )
    return run_id


async def contact(conn: asyncpg.Connection, user: str = "ada", **fields: str) -> None:
    values = {"email": f"{user}@example.com", "phone": "+14155550100", "timezone": "UTC", **fields}
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, phone, timezone) VALUES ($1, $2, $3, $4)",
        user,
        values["email"] or None,
        values["phone"] or None,
        values["timezone"],
    )


async def settle(runner: WorkflowRunner) -> int:
    """Evaluate until nothing is due; how many evaluations that took."""
    for count in range(50):
        if not await runner.run_one():
            return count
    raise AssertionError("a run is evaluated again and again")


async def run_of(conn: asyncpg.Connection, run_id: int) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM pgnotify.workflow_runs WHERE id = $1", run_id)
    assert row is not None
    return row


async def steps_of(conn: asyncpg.Connection, run_id: int) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT step, outcome FROM pgnotify.workflow_run_steps WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    return [(r["step"], r["outcome"]) for r in rows]


async def made_by(conn: asyncpg.Connection, run_id: int) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT s.step, n.* FROM pgnotify.workflow_run_steps s "
        "JOIN pgnotify.notifications n ON n.id = s.notification_id WHERE s.run_id = $1",
        run_id,
    )
    return {r["step"]: r for r in rows}


async def time_passes(conn: asyncpg.Connection, run_id: int) -> None:
    """The run's delay is over (its next_at moves to now): what the clock would do."""
    await conn.execute("UPDATE pgnotify.workflow_runs SET next_at = now() WHERE id = $1", run_id)


async def wait_for(conn: asyncpg.Connection, query: str, *args: Any, timeout: float = 20.0) -> Any:
    """Until `query` returns a truthy value (polled: the worker runs in another task/process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await conn.fetchval(query, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {query} {args}")
        await asyncio.sleep(0.05)


EMAIL = {"name": "email", "kind": "send", "channel": "email", "template": "t"}
INAPP = {"name": "inapp", "kind": "send", "channel": "inapp", "body": "You have a reply"}


async def templates(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES "
        "('t', 'email', 'Hi {{ name }}', 'Hello'), ('t', 'sms', NULL, 'Hello'), "
        "('t', 'inapp', 'Hi', 'Hello')"
    )


# --- send -----------------------------------------------------------------------------------------


async def test_a_send_step_makes_one_notification_with_the_payload_and_a_stable_key(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await templates(conn)
    await contact(conn)
    await define(conn, "welcome", [{**EMAIL, "overrides": {"source": "workflow"}}], "onboarding")
    run_id = await trigger(conn, "welcome", payload={"name": "Ada"})

    assert await settle(runner) == 1
    sent = (await made_by(conn, run_id))["email"]
    assert (sent["channel"], sent["recipient"], sent["user_id"], sent["category"]) == (
        "email",
        "ada@example.com",
        "ada",
        "onboarding",
    )
    assert sent["payload"] == {"name": "Ada", "source": "workflow"}
    assert sent["idempotency_key"] == f"workflow:{run_id}:email"
    run = await run_of(conn, run_id)
    assert (run["status"], run["reason"], run["current_step"]) == (
        "completed",
        "all steps done",
        None,
    )


async def test_a_user_without_an_address_is_recorded_and_counts_as_failed(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await templates(conn)
    await contact(conn, phone="")
    await define(
        conn,
        "sms_or_inapp",
        [
            {"name": "sms", "kind": "send", "channel": "sms", "template": "t"},
            {"name": "no_sms", "kind": "condition", "step": "sms", "is": "failed", "else": "stop"},
            INAPP,
        ],
    )
    run_id = await trigger(conn, "sms_or_inapp")
    await settle(runner)
    assert await steps_of(conn, run_id) == [
        ("sms", "unreachable"),
        ("no_sms", "true"),
        ("inapp", "created"),
    ]
    assert list(await made_by(conn, run_id)) == ["inapp"]


async def test_a_notification_the_database_refuses_fails_the_step_not_the_run(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await contact(conn)
    # an email with a body and no subject and no template: the INSERT is refused
    await define(
        conn,
        "no_subject",
        [
            {"name": "email", "kind": "send", "channel": "email", "body": "x"},
            {"name": "bad", "kind": "condition", "step": "email", "is": "failed", "else": "stop"},
            INAPP,
        ],
    )
    run_id = await trigger(conn, "no_subject")
    await settle(runner)
    assert await steps_of(conn, run_id) == [
        ("email", "refused"),
        ("bad", "true"),
        ("inapp", "created"),
    ]
    detail = await conn.fetchval(
        "SELECT detail FROM pgnotify.workflow_run_steps WHERE run_id = $1 AND step = 'email'",
        run_id,
    )
    assert "subject" in detail
    assert (await run_of(conn, run_id))["status"] == "completed"


# --- delay and stop -------------------------------------------------------------------------------


async def test_a_fixed_delay_is_a_row_due_later_not_a_sleeping_task(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await define(
        conn,
        "later",
        [INAPP, {"name": "wait", "kind": "delay", "minutes": 10}, {**INAPP, "name": "again"}],
    )
    run_id = await trigger(conn, "later")
    assert await settle(runner) == 1
    run = await run_of(conn, run_id)
    assert (run["status"], run["current_step"]) == ("running", "again")
    waits = await conn.fetchval("SELECT $1::timestamptz - now()", run["next_at"])
    assert dt.timedelta(minutes=9, seconds=55) < waits <= dt.timedelta(minutes=10)
    assert list(await made_by(conn, run_id)) == ["inapp"]

    await time_passes(conn, run_id)
    assert await settle(runner) == 1
    assert sorted(await made_by(conn, run_id)) == ["again", "inapp"]
    assert (await run_of(conn, run_id))["status"] == "completed"


async def test_a_delay_until_nine_local_crosses_the_dst_change_in_the_users_zone(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await contact(conn, timezone="America/New_York")
    await define(conn, "morning", [{"name": "d", "kind": "delay", "until": "09:00"}, INAPP])
    run_id = await trigger(conn, "morning")
    # Saturday 2026-03-07 10:00 EST; New York springs forward that night
    saturday = dt.datetime(2026, 3, 7, 15, 0, tzinfo=dt.UTC)
    await conn.execute("UPDATE pgnotify.workflow_runs SET next_at = $1", saturday)
    assert await runner.run_one(at=saturday)  # the clock stands at that Saturday
    run = await run_of(conn, run_id)
    assert run["next_at"] == dt.datetime(2026, 3, 8, 13, 0, tzinfo=dt.UTC)  # 09:00 EDT
    assert run["current_step"] == "inapp"


async def test_a_stop_step_ends_the_run_with_its_reason(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await define(
        conn, "stops", [{"name": "halt", "kind": "stop", "reason": "nothing to say"}, INAPP]
    )
    run_id = await trigger(conn, "stops")
    await settle(runner)
    run = await run_of(conn, run_id)
    assert (run["status"], run["reason"]) == ("completed", "nothing to say")
    assert await steps_of(conn, run_id) == [("halt", "stopped")]
    assert await made_by(conn, run_id) == {}


# --- conditions -----------------------------------------------------------------------------------


async def _mark(conn: asyncpg.Connection, nid: int, status: str, *events: str) -> None:
    await conn.execute("UPDATE pgnotify.notifications SET status = $2 WHERE id = $1", nid, status)
    for event in events:
        await conn.execute(
            "INSERT INTO pgnotify.events (notification_id, event) VALUES ($1, $2)", nid, event
        )


@pytest.mark.parametrize(
    ("channel", "is_", "status", "events", "read", "expected"),
    [
        ("email", "sent", "sent", (), False, "true"),
        ("email", "sent", "failed", (), False, "false"),
        ("email", "delivered", "sent", ("delivered",), False, "true"),
        ("email", "delivered", "sent", (), False, "false"),
        ("email", "clicked", "sent", ("clicked",), False, "true"),
        ("email", "clicked", "sent", ("delivered",), False, "false"),
        ("email", "failed", "dead", (), False, "true"),
        ("email", "failed", "sent", ("bounced",), False, "true"),
        ("email", "failed", "sent", (), False, "false"),
        ("email", "bounced", "sent", ("bounced",), False, "true"),
        ("email", "skipped", "skipped", (), False, "true"),
        ("inapp", "read", "sent", (), True, "true"),
        ("inapp", "seen", "sent", (), False, "false"),
    ],
)
async def test_each_condition_on_an_earlier_step(
    conn: asyncpg.Connection,
    runner: WorkflowRunner,
    channel: str,
    is_: str,
    status: str,
    events: tuple[str, ...],
    read: bool,
    expected: str,
) -> None:
    await templates(conn)
    await contact(conn)
    send = {"name": "s", "kind": "send", "channel": channel, "template": "t"}
    await define(
        conn,
        "cond",
        [
            send,
            {"name": "wait", "kind": "delay", "seconds": 60},
            {"name": "c", "kind": "condition", "step": "s", "is": is_},
        ],
    )
    run_id = await trigger(conn, "cond")
    await settle(runner)
    nid = (await made_by(conn, run_id))["s"]["id"]
    await _mark(conn, nid, status, *events)
    if read:
        await conn.execute(
            "INSERT INTO pgnotify.inbox (notification_id, user_id, read_at) VALUES ($1, 'ada', now())",
            nid,
        )
    await time_passes(conn, run_id)
    await settle(runner)
    assert (await steps_of(conn, run_id))[-1] == ("c", expected)
    assert (await run_of(conn, run_id))["status"] == "completed"


async def test_a_condition_on_an_outcome_not_known_yet_looks_again_later(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    runner = WorkflowRunner(pool, "wf-test", recheck_interval=120.0)
    await templates(conn)
    await contact(conn)
    await define(
        conn,
        "pending",
        [EMAIL, {"name": "c", "kind": "condition", "step": "email", "is": "failed"}],
    )
    run_id = await trigger(conn, "pending")
    await settle(runner)
    run = await run_of(conn, run_id)
    assert (run["status"], run["current_step"]) == ("running", "c")  # the email is still queued
    assert await conn.fetchval("SELECT $1::timestamptz > now() + interval '100 s'", run["next_at"])

    await _mark(conn, (await made_by(conn, run_id))["email"]["id"], "failed")
    await time_passes(conn, run_id)
    await settle(runner)
    assert await steps_of(conn, run_id) == [("email", "created"), ("c", "true")]


@pytest.mark.parametrize(("setting", "expected"), [("off", "true"), ("daily", "false")])
async def test_a_condition_on_the_users_preference(
    conn: asyncpg.Connection, runner: WorkflowRunner, setting: str, expected: str
) -> None:
    await conn.execute("SELECT pgnotify.set_preference('ada', $1, 'email', 'comments')", setting)
    await define(
        conn,
        "prefs",
        [{"name": "email_off", "kind": "condition", "preference": "email", "is": "off"}],
        "comments",
    )
    run_id = await trigger(conn, "prefs")
    await settle(runner)
    assert await steps_of(conn, run_id) == [("email_off", expected)]


# --- cancellation ---------------------------------------------------------------------------------


async def test_cancel_run_by_id_or_key_stops_it_and_takes_back_what_is_not_sent(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await templates(conn)
    await contact(conn)
    await define(conn, "slow", [EMAIL, {"name": "w", "kind": "delay", "hours": 1}, INAPP])
    run_id = await trigger(conn, "slow")
    await settle(runner)
    email = (await made_by(conn, run_id))["email"]
    assert email["status"] == "queued"

    assert await conn.fetchval("SELECT pgnotify.cancel_run($1::bigint, 'user left')", run_id)
    run = await run_of(conn, run_id)
    assert (run["status"], run["reason"]) == ("cancelled", "user left")
    email_now = await conn.fetchrow(
        "SELECT status FROM pgnotify.notifications WHERE id = $1", email["id"]
    )
    assert email_now["status"] == "cancelled"
    assert not await conn.fetchval("SELECT pgnotify.cancel_run($1::bigint, 'again')", run_id)
    await time_passes(conn, run_id)
    assert await settle(runner) == 0  # a cancelled run is never evaluated again

    keyed = await trigger(conn, "slow", key="order-7")
    assert await conn.fetchval("SELECT pgnotify.cancel_run('order-7')")
    assert (await run_of(conn, keyed))["status"] == "cancelled"
    assert not await conn.fetchval("SELECT pgnotify.cancel_run('no-such-key')")


async def test_reading_the_in_app_message_cancels_the_pending_email_at_once(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await conn.execute(FALLBACK_SQL.read_text())
    await contact(conn)
    run_id = await trigger(conn, "comment_reply_fallback", payload={"author": "Bo"})
    await settle(runner)
    inapp = (await made_by(conn, run_id))["inapp"]
    # the worker delivers the in-app message (what adapters do for channel inapp)
    await conn.execute(
        "INSERT INTO pgnotify.inbox (notification_id, user_id, title) VALUES ($1, 'ada', 'Hi')",
        inapp["id"],
    )
    await _mark(conn, inapp["id"], "sent")
    assert (await run_of(conn, run_id))["status"] == "running"

    assert await conn.fetchval("SELECT pgnotify.inbox_mark_read('ada')") == 1
    run = await run_of(conn, run_id)  # no worker needed: the read itself cancels
    assert (run["status"], run["reason"]) == (
        "cancelled",
        "cancelled: the in-app message of step 'inapp' was read",
    )
    await time_passes(conn, run_id)
    assert await settle(runner) == 0
    assert list(await made_by(conn, run_id)) == ["inapp"]  # no email, ever


async def test_a_read_message_stops_the_run_at_the_condition_without_cancel_if(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await templates(conn)
    await contact(conn)
    await define(
        conn,
        "plain",
        [
            INAPP,
            {"name": "w", "kind": "delay", "minutes": 10},
            {"name": "unread", "kind": "condition", "step": "inapp", "is": "read", "then": "stop"},
            EMAIL,
        ],
    )
    run_id = await trigger(conn, "plain")
    await settle(runner)
    nid = (await made_by(conn, run_id))["inapp"]["id"]
    await conn.execute(
        "INSERT INTO pgnotify.inbox (notification_id, user_id) VALUES ($1, 'ada')", nid
    )
    await conn.execute("SELECT pgnotify.inbox_mark_read('ada')")
    assert (await run_of(conn, run_id))["status"] == "running"  # nothing said cancel_if
    await time_passes(conn, run_id)
    await settle(runner)
    run = await run_of(conn, run_id)
    assert (run["status"], run["reason"]) == (
        "completed",
        "stopped: condition 'unread' was true (step 'inapp' is read)",
    )
    assert list(await made_by(conn, run_id)) == ["inapp"]


# --- trigger and define ---------------------------------------------------------------------------


async def test_trigger_is_idempotent_transactional_and_refuses_the_unknown(
    conn: asyncpg.Connection,
) -> None:
    await define(conn, "hello", [INAPP])
    await define(conn, "bye", [INAPP])
    first = await trigger(conn, "hello", payload={"n": 1}, key="evt-1")
    assert await trigger(conn, "hello", payload={"n": 1}, key="evt-1") == first
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_runs") == 1
    with pytest.raises(
        asyncpg.CheckViolationError, match=r"already started run .* different payload"
    ):
        await trigger(conn, "hello", payload={"n": 2}, key="evt-1")
    with pytest.raises(
        asyncpg.CheckViolationError,
        match="unknown workflow 'helo'; known workflows: 'bye', 'hello'",
    ):
        await trigger(conn, "helo")
    with pytest.raises(asyncpg.CheckViolationError, match="needs a user_id"):
        await trigger(conn, "hello", user="")

    # inside the producer's transaction: rolled back, no run
    tx = conn.transaction()
    await tx.start()
    await trigger(conn, "hello", key="evt-2")
    await tx.rollback()
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_runs") == 1


async def test_define_makes_versions_and_a_run_keeps_the_version_it_started_with(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    assert await define(conn, "v", [INAPP]) == 1
    assert await define(conn, "v", [INAPP]) == 1  # the same again: no new version
    old_run = await trigger(conn, "v")
    assert await define(conn, "v", [{**INAPP, "body": "v2"}]) == 2
    new_run = await trigger(conn, "v")
    await settle(runner)
    assert (await made_by(conn, old_run))["inapp"]["body"] == "You have a reply"
    assert (await made_by(conn, new_run))["inapp"]["body"] == "v2"
    assert [
        r["version"]
        for r in await conn.fetch("SELECT version FROM pgnotify.workflow_runs ORDER BY id")
    ] == [1, 2]


SMS = {"name": "sms", "kind": "send", "channel": "sms", "body": "x"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "must be a non-empty JSON array"),
        ([{"kind": "sned"}], "unknown step kind 'sned' in step 'step1'"),
        ([{"kind": "send", "channel": "fax", "body": "x"}], "unknown channel 'fax'"),
        ([{**SMS, "than": "x"}], "has no setting 'than'"),
        ([{"kind": "send", "channel": "email"}], "has neither a template nor a body"),
        ([{"kind": "delay", "until": "9am"}], "must be a local time HH:MM"),
        ([{"kind": "delay", "minutes": 0}], "must wait more than 0 seconds"),
        (
            [{"name": "c", "kind": "condition", "step": "sms", "is": "sent"}, SMS],
            "refers to step 'sms', which comes later",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "smss", "is": "sent"}],
            "refers to unknown step 'smss'",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "sms", "is": "read"}],
            "'read' needs an in-app step",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "sms", "is": "sent", "then": "sms"}],
            "then goes back to step 'sms', which would make a cycle",
        ),
        (
            [SMS, {"name": "c", "kind": "condition", "step": "sms", "is": "sent", "else": "zz"}],
            "else goes to unknown step 'zz'",
        ),
        ([SMS, SMS], "has two steps named 'sms'"),
        ([{**SMS, "cancel_if": {"step": "sms", "is": "read"}}], "refers to step 'sms', which is"),
        (
            [{**SMS, "batch": "15 minutes"}],
            "batch of step 'sms' of workflow 'bad' must be an object",
        ),
        ([{**SMS, "batch": {"window": "1 minute", "size": 3}}], "has no setting 'size'"),
        (
            [{**SMS, "batch": {"window": "15 mins"}}],
            "window of the batch of step 'sms' of workflow 'bad' must be a time from 1 second to 7 d",
        ),
        ([{**SMS, "batch": {"window": "8 days"}}], "from 1 second to 7 days, like"),
        ([{**SMS, "batch": {"key": "thread"}}], "window of the batch .* not missing"),
        (
            [{**SMS, "batch": {"key": "{{ payload.thread", "window": "1 minute"}}],
            "key of the batch of step 'sms' of workflow 'bad' must name a payload field",
        ),
        (
            [{**SMS, "batch": {"window": "1 minute", "items": 0}}],
            "items of the batch of step 'sms' of workflow 'bad' must be an integer from 1 to 100",
        ),
        ([{"kind": "delay", "minutes": 1, "batch": {"window": "1 minute"}}], "no setting 'batch'"),
    ],
)
async def test_bad_definitions_are_refused_with_the_problem_named(
    conn: asyncpg.Connection, steps: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match=message):
        await define(conn, "bad", steps)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflows") == 0


async def test_plain_inserts_define_a_workflow_checked_at_commit(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO pgnotify.workflows (name, version) VALUES ('plain', 1)")
        await conn.execute(
            "INSERT INTO pgnotify.workflow_steps (workflow, version, position, name, kind, channel, "
            "settings) VALUES ('plain', 1, 1, 'hi', 'send', 'inapp', '{\"body\": \"Hi\"}')"
        )
    assert await trigger(conn, "plain") > 0

    with pytest.raises(asyncpg.CheckViolationError, match="refers to unknown step 'nope'"):
        async with conn.transaction():
            await conn.execute("INSERT INTO pgnotify.workflows (name, version) VALUES ('x', 1)")
            await conn.execute(
                "INSERT INTO pgnotify.workflow_steps (workflow, version, position, name, kind, "
                "settings) VALUES ('x', 1, 1, 'c', 'condition', '{\"step\": \"nope\", \"is\": \"sent\"}')"
            )
    with pytest.raises(asyncpg.CheckViolationError, match="has no steps"):
        async with conn.transaction():
            await conn.execute("INSERT INTO pgnotify.workflows (name, version) VALUES ('y', 1)")


async def test_a_run_inserted_at_a_step_its_version_lacks_fails_with_the_reason(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await define(conn, "short", [INAPP])
    run_id = await conn.fetchval(
        "INSERT INTO pgnotify.workflow_runs (workflow, version, user_id, current_step) "
        "VALUES ('short', 1, 'ada', 'nope') RETURNING id"
    )
    assert await settle(runner) == 1
    run = await run_of(conn, run_id)
    assert (run["status"], run["reason"]) == (
        "failed",
        "cannot run: workflow 'short' has no step 'nope'",
    )


# --- views ----------------------------------------------------------------------------------------


async def test_runs_and_their_steps_show_in_the_views_and_the_timeline(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await templates(conn)
    await contact(conn)
    await define(conn, "shown", [INAPP, {"name": "w", "kind": "delay", "hours": 2}, EMAIL])
    run_id = await trigger(conn, "shown")
    await settle(runner)
    view = await conn.fetchrow(
        "SELECT * FROM pgnotify.workflow_runs_view WHERE run_id = $1", run_id
    )
    assert (view["state"], view["current_step"], view["last_step"], view["last_outcome"]) == (
        "waiting",
        "email",
        "w",
        "waiting",
    )
    assert await conn.fetchval("SELECT pgnotify.cancel_run($1::bigint, 'test over')", run_id)
    timeline = await conn.fetch(
        "SELECT notification_id, event, error_code, error, workflow_step "
        "FROM pgnotify.processing_timeline WHERE workflow_run_id = $1 ORDER BY at, seq",
        run_id,
    )
    story = [(r["event"], r["workflow_step"]) for r in timeline]
    assert story[:3] == [("queued", "inapp"), ("workflow_send", "inapp"), ("workflow_delay", "w")]
    # in the same instant: the run ends, and the in-app message it had queued is taken back
    assert sorted(story[3:]) == [("cancelled", "inapp"), ("workflow_cancelled", "email")]
    assert {r["error"] for r in timeline if r["event"] == "workflow_cancelled"} == {"test over"}
    assert timeline[2]["error_code"] == "waiting" and "until" in timeline[2]["error"]
    nid = (await made_by(conn, run_id))["inapp"]["id"]
    by_notification = await conn.fetch(
        "SELECT event, workflow_run_id FROM pgnotify.processing_timeline "
        "WHERE notification_id = $1 ORDER BY at, seq",
        nid,
    )
    assert {r["workflow_run_id"] for r in by_notification} == {run_id}


# --- the runner's guarantees ----------------------------------------------------------------------


async def test_two_runners_never_evaluate_the_same_run_twice(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await define(conn, "race", [INAPP, {**INAPP, "name": "two"}])
    runs = [await trigger(conn, "race", user=f"u{i}") for i in range(20)]
    a, b = WorkflowRunner(pool, "a"), WorkflowRunner(pool, "b")
    await asyncio.gather(settle(a), settle(b))
    counts = await conn.fetch(
        "SELECT s.run_id, count(*) FROM pgnotify.workflow_run_steps s "
        "JOIN pgnotify.notifications n ON n.id = s.notification_id GROUP BY 1"
    )
    assert sorted(r["run_id"] for r in counts) == sorted(runs)
    assert {r["count"] for r in counts} == {2}
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 40


async def test_a_worker_killed_between_steps_loses_nothing_and_sends_nothing_twice(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await define(
        conn,
        "killed",
        [INAPP, {"name": "w", "kind": "delay", "seconds": 4}, {**INAPP, "name": "second"}],
    )
    env = replica_env(
        dsn,
        "wf-a",
        PGNOTIFY_CHANNELS="inapp",
        PGNOTIFY_CHANNEL_CONCURRENCY="inapp=5",
        PGNOTIFY_WORKFLOW_POLL_INTERVAL="0.2",
        # a notification the killed worker had claimed comes back when its lease expires
        PGNOTIFY_LEASE_SECONDS="2",
        PGNOTIFY_REAP_INTERVAL="0.3",
    )
    first = await WorkerProcess(env).start()
    second = WorkerProcess({**env, "PGNOTIFY_WORKER_ID": "wf-b"})
    try:
        await first.ready()
        run_id = await trigger(conn, "killed")
        # the first step and the delay are committed: the run waits as a row
        await wait_for(
            conn,
            "SELECT count(*) = 2 FROM pgnotify.workflow_run_steps WHERE run_id = $1",
            run_id,
        )
        first.kill()
        assert await first.wait() != 0
        await second.start()
        await second.ready()
        await wait_for(
            conn, "SELECT status = 'completed' FROM pgnotify.workflow_runs WHERE id = $1", run_id
        )
        await wait_for(
            conn,
            "SELECT count(*) = 2 FROM pgnotify.notifications WHERE status = 'sent'",
        )
    finally:
        await first.close()
        await second.close()
    rows = await conn.fetch(
        "SELECT idempotency_key, status FROM pgnotify.notifications ORDER BY id"
    )
    assert [(r["idempotency_key"], r["status"]) for r in rows] == [
        (f"workflow:{run_id}:inapp", "sent"),
        (f"workflow:{run_id}:second", "sent"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox") == 2
    workers = await conn.fetch(
        "SELECT step, worker FROM pgnotify.workflow_run_steps WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    assert [(r["step"], r["worker"]) for r in workers] == [
        ("inapp", "wf-a"),
        ("w", "wf-a"),
        ("second", "wf-b"),
    ]


async def test_a_crash_in_the_middle_of_an_evaluation_rolls_all_of_it_back(
    conn: asyncpg.Connection, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    await define(conn, "crash", [INAPP, {**INAPP, "name": "two"}, {**INAPP, "name": "three"}])
    run_id = await trigger(conn, "crash")
    runner = WorkflowRunner(pool, "crashy")
    real_record = WorkflowRunner._record
    calls = 0

    async def dying_record(self: WorkflowRunner, *args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the second notification is made, before it is recorded
            raise ConnectionResetError("worker died")
        await real_record(self, *args)

    monkeypatch.setattr(WorkflowRunner, "_record", dying_record)
    with pytest.raises(ConnectionResetError):
        await runner.run_one()
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0
    assert (await run_of(conn, run_id))["current_step"] == "inapp"

    monkeypatch.setattr(WorkflowRunner, "_record", real_record)
    await settle(runner)
    assert sorted(await made_by(conn, run_id)) == ["inapp", "three", "two"]
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 3


# --- the shipped example, end to end --------------------------------------------------------------


async def test_the_fallback_example_goes_from_in_app_to_email_to_sms(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    await conn.execute(FALLBACK_SQL.read_text())
    await conn.execute(FALLBACK_SQL.read_text())  # idempotent
    assert await conn.fetchval("SELECT max(version) FROM pgnotify.workflows") == 1
    await contact(conn)
    outbox = tmp_path / "outbox.jsonl"
    async with FakeResend(RESEND_KEY) as resend:
        resend.fail_next(1, status=422)  # the email is refused for good
        settings = worker_settings(
            email_providers="resend",
            resend_api_key=RESEND_KEY,
            resend_base_url=resend.url,
            email_from="noreply@example.com",
            sms_providers="file",
            file_sink_path=str(outbox),
            workflow_poll_interval=0.2,
            workflow_recheck_interval=0.2,
        )
        async with running(settings):
            run_id = await trigger(
                conn,
                "comment_reply_fallback",
                payload={"author": "Bo", "excerpt": "Agreed", "url": "https://example.com/t/7"},
                key="comment-1:ada",
            )
            await wait_for(
                conn,
                "SELECT current_step = 'unread' FROM pgnotify.workflow_runs WHERE id = $1",
                run_id,
            )
            await wait_for(conn, "SELECT count(*) FROM pgnotify.inbox")  # in the app, unread
            await time_passes(conn, run_id)  # ten minutes later
            await wait_for(
                conn,
                "SELECT status <> 'running' FROM pgnotify.workflow_runs WHERE id = $1",
                run_id,
            )
            await wait_for(
                conn,
                "SELECT status = 'sent' FROM pgnotify.notifications WHERE channel = 'sms'",
            )
    run = await run_of(conn, run_id)
    assert run["status"] == "completed"
    assert await steps_of(conn, run_id) == [
        ("inapp", "created"),
        ("wait", "waiting"),
        ("unread", "false"),
        ("email", "created"),
        ("failed", "true"),
        ("sms", "created"),
    ]
    made = await made_by(conn, run_id)
    assert {step: row["status"] for step, row in made.items()} == {
        "inapp": "sent",
        "email": "failed",
        "sms": "sent",
    }
    (texted,) = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert "Bo replied to you: https://example.com/t/7" in json.dumps(texted)


async def test_a_run_that_breaks_the_evaluation_fails_alone_and_its_batch_goes_on(
    conn: asyncpg.Connection, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgnotify_worker.adapters import workflow_runner

    await define(conn, "fine", [INAPP])
    await define(conn, "cursed", [INAPP])
    good = await trigger(conn, "fine")
    bad = await trigger(conn, "cursed")
    real_parse = workflow_runner.parse

    def parse(name: str, *args: Any) -> Any:
        if name == "cursed":
            raise ValueError("a bug")
        return real_parse(name, *args)

    monkeypatch.setattr(workflow_runner, "parse", parse)
    assert await WorkflowRunner(pool, "w", batch=20).run_due() == 2  # one transaction
    assert (await run_of(conn, good))["status"] == "completed"
    broken = await run_of(conn, bad)
    assert (broken["status"], broken["reason"]) == (
        "failed",
        "cannot evaluate: ValueError: a bug",
    )
    assert await made_by(conn, bad) == {}


# --- batching per send step -------------------------------------------------------------------------

BATCHED = {
    "name": "email",
    "kind": "send",
    "channel": "email",
    "subject": "{{ count }} replies in {{ batch_key }}",
    "body": "{% for i in items %}{{ i.payload.text }};{% endfor %}{% if more %} +{{ more }}{% endif %}",
    "batch": {"key": "{{ payload.thread_id }}", "window": "15 minutes", "items": 3},
}


async def test_a_batched_send_step_folds_a_windows_triggers_into_one_send_and_runs_go_on(
    conn: asyncpg.Connection,
    runner: WorkflowRunner,
    worker_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    await contact(conn)
    await define(
        conn,
        "replies",
        [
            BATCHED,
            {"name": "went", "kind": "condition", "step": "email", "is": "sent", "else": "stop"},
            {"name": "inapp", "kind": "send", "channel": "inapp", "body": "after"},
        ],
    )
    runs = [
        await trigger(conn, "replies", payload={"thread_id": 7, "text": f"r{i}"}) for i in range(5)
    ]
    other = await trigger(conn, "replies", payload={"thread_id": 8, "text": "x"})
    assert await settle(runner) == 6  # each run's send folds into its thread's window
    windows = await conn.fetch(
        "SELECT * FROM pgnotify.batches WHERE reason = 'workflow' ORDER BY id"
    )
    assert [(w["shown_key"], w["items"]) for w in windows] == [("7", 5), ("8", 1)]
    assert windows[0]["closes_at"] - windows[0]["opened_at"] == dt.timedelta(minutes=15)
    for run_id in runs:  # each waits for the window's notification, then goes on
        run = await run_of(conn, run_id)
        assert (run["status"], run["current_step"], run["next_at"]) == (
            "running",
            "went",
            windows[0]["closes_at"],
        )
        (detail,) = await conn.fetch(
            "SELECT outcome, detail FROM pgnotify.workflow_run_steps WHERE run_id = $1", run_id
        )
        assert detail["outcome"] == "created" and detail["detail"].startswith("batched until ")
    carrier = windows[0]["notification_id"]
    outbox = tmp_path / "outbox.jsonl"
    settings = worker_settings(
        email_providers="file",
        inapp_providers="file",
        file_sink_path=str(outbox),
        workflow_poll_interval=0.2,
        workflow_recheck_interval=0.2,
    )
    async with running(settings):
        # the window's end comes (what the clock would do), and its one email goes out
        await conn.execute(
            "UPDATE pgnotify.notifications SET run_at = now() WHERE id = $1", carrier
        )
        await wait_for(
            conn, "SELECT status = 'sent' FROM pgnotify.notifications WHERE id = $1", carrier
        )
        for run_id in runs:
            await time_passes(conn, run_id)
        await wait_for(
            conn,
            "SELECT bool_and(status = 'completed') FROM pgnotify.workflow_runs WHERE id = ANY($1)",
            runs,
        )
        await wait_for(
            conn,
            "SELECT count(*) = 5 FROM pgnotify.notifications "
            "WHERE channel = 'inapp' AND status = 'sent'",
        )
    for run_id in runs:
        assert await steps_of(conn, run_id) == [
            ("email", "created"),
            ("went", "true"),  # the folded send answers with the email that carried it
            ("inapp", "created"),
        ]
    items = await conn.fetch(
        "SELECT n.status, n.digest_id FROM pgnotify.workflow_run_steps s "
        "JOIN pgnotify.notifications n ON n.id = s.notification_id "
        "WHERE s.run_id = ANY($1) AND s.step = 'email'",
        runs,
    )
    assert {tuple(r) for r in items} == {("digested", carrier)}
    mails = [m for m in map(json.loads, outbox.read_text().splitlines()) if m["channel"] == "email"]
    assert [(m["subject"], m["text"]) for m in mails] == [("5 replies in 7", "r0;r1;r2; +2")]
    # the other thread's window is still open, its run still waiting for it
    assert (await run_of(conn, other))["current_step"] == "went"
    assert (
        await conn.fetchval(
            "SELECT status FROM pgnotify.notifications WHERE id = $1", windows[1]["notification_id"]
        )
        == "scheduled"
    )


async def test_a_send_whose_payload_lacks_the_batch_key_goes_out_alone(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await contact(conn)
    await define(conn, "replies", [BATCHED])
    run_id = await trigger(conn, "replies", payload={"text": "no thread"})
    await settle(runner)
    (step,) = await conn.fetch(
        "SELECT outcome, detail FROM pgnotify.workflow_run_steps WHERE run_id = $1", run_id
    )
    assert tuple(step) == ("created", "not batched: the payload has no payload.thread_id")
    made = (await made_by(conn, run_id))["email"]
    assert (made["status"], made["batch_id"]) == ("queued", None)
    assert (await run_of(conn, run_id))["status"] == "completed"
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.batches") == 0


async def test_a_batched_step_repeated_after_a_crash_joins_its_window_once(
    conn: asyncpg.Connection, runner: WorkflowRunner
) -> None:
    await contact(conn)
    await define(conn, "replies", [BATCHED, INAPP])
    run_id = await trigger(conn, "replies", payload={"thread_id": 7, "text": "a"})
    await settle(runner)
    # the step is evaluated again (as after a worker died before its commit was seen)
    await conn.execute(
        "DELETE FROM pgnotify.workflow_run_steps WHERE run_id = $1; "
        "UPDATE pgnotify.workflow_runs SET current_step = 'email', next_at = now() WHERE id = $1".replace(
            "$1", str(run_id)
        )
    )
    await settle(runner)
    (window,) = await conn.fetch("SELECT items FROM pgnotify.batches")
    assert window["items"] == 1
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE channel = 'email' AND batch_of IS NULL"
        )
        == 1
    )
