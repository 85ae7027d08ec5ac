"""Workflows seen from outside (schema 0024): the metrics and the /status section of a running
worker count runs in each state and the steps it took; an overdue run (no runner) shows its age,
which the PgnotifyWorkflowStepsOverdue alert watches; throttled sends and open batching windows
are counted; retention deletes finished runs in batches, keeping those a kept notification
still names; and the gauges' query stays cheap with a million runs."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.workflow_runner import WorkflowRunner
from pgnotify_worker.config import Settings
from tests.support.cli import cli
from tests.support.db import wait_rows
from tests.support.roles import LoginAs
from tests.support.scrape import scrape_until
from tests.support.worker import running
from tests.test_console import ADMIN, VIEWER, client, log_in
from tests.test_scale_plans import explain
from tests.test_throttle import send_four
from tests.test_workflows import contact, define, settle, trigger


def sample(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def define_each_ending(conn: asyncpg.Connection) -> None:
    await contact(conn, "ada")
    await define(conn, "done", [{"name": "hi", "kind": "send", "channel": "inapp", "body": "hi"}])
    await define(conn, "halt", [{"name": "end", "kind": "stop", "reason": "nothing to do"}])
    await define(
        conn,
        "nope",
        [
            {"name": "ask", "kind": "condition", "preference": "email", "is": "off",
             "then": "next", "else": "last"},
            {"name": "mail", "kind": "send", "channel": "email", "subject": "s", "body": "x"},
            {"name": "last", "kind": "send", "channel": "inapp", "body": "y",
             "cancel_if": {"step": "mail", "is": "skipped"}},
        ],
    )  # fmt: skip
    await define(
        conn,
        "later",
        [
            {"name": "wait", "kind": "delay", "hours": 1},
            {"name": "then", "kind": "send", "channel": "inapp", "body": "later"},
        ],
    )
    # no email provider in these workers: the email waits, and so does the condition on it
    await define(
        conn,
        "watch",
        [
            {"name": "mail", "kind": "send", "channel": "email", "subject": "s", "body": "x"},
            {"name": "check", "kind": "condition", "step": "mail", "is": "sent"},
        ],
    )


async def test_metrics_and_status_count_runs_in_each_state(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await define_each_ending(conn)
    for name in ("done", "halt", "nope", "later", "watch"):
        await trigger(conn, name)
    # a run at a step its version does not have: the runner fails it
    await conn.execute(
        "INSERT INTO pgnotify.workflow_runs (workflow, version, user_id, current_step) "
        "VALUES ('done', 1, 'ada', 'ghost')"
    )
    finished = 'pgnotify_workflow_runs_finished_total{outcome="%s"}'

    def settled(text: str) -> bool:
        ended = [sample(text, finished % o) for o in ("completed", "stopped", "cancelled")]
        return (
            ended == [1.0, 1.0, 1.0]
            and sample(text, finished % "failed") == 1.0
            and sample(text, "pgnotify_workflow_runs_waiting", '{state="delayed"}') == 1.0
            and sample(text, "pgnotify_workflow_runs_waiting", '{state="waiting_send"}') == 1.0
        )

    async with (
        running(worker_settings(queue_metrics_interval=0.2)) as service,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        base = f"http://127.0.0.1:{service.http_port}"
        text = await scrape_until(http, base + "/metrics", settled)
        status = await (await http.get(base + "/status")).json()

    assert sample(text, "pgnotify_workflow_runs_started_total") == 6
    assert sample(text, "pgnotify_workflow_runs_waiting", '{state="due"}') == 0
    assert sample(text, "pgnotify_workflow_oldest_overdue_seconds") == 0
    steps = "pgnotify_workflow_steps_total"
    assert sample(text, steps, '{kind="send",outcome="created"}') == 2  # done.hi, watch.mail
    assert sample(text, steps, '{kind="condition",outcome="false"}') == 1  # nope.ask
    assert sample(text, steps, '{kind="stop",outcome="stopped"}') == 1
    assert sample(text, steps, '{kind="delay",outcome="waiting"}') == 1
    # what the database says, run by run
    rows = await conn.fetch("SELECT workflow, state, waiting_on FROM pgnotify.workflow_runs_view")
    assert sorted(tuple(r) for r in rows) == [
        ("done", "completed", None),
        ("done", "failed", None),
        ("halt", "completed", None),
        ("later", "waiting", "delay"),
        ("nope", "cancelled", None),
        ("watch", "waiting", "send"),
    ]

    section = status["workflows"]
    assert section["runner_enabled"] is True
    assert section["runs_waiting"] == {"due": 0, "delayed": 1, "waiting_send": 1}
    assert section["oldest_overdue_seconds"] == 0
    assert section["batch_windows_open"] == 0
    mine = section["this_worker"]
    assert mine["runs_started"] == 6
    assert mine["runs_finished"] == {"completed": 1, "stopped": 1, "cancelled": 1, "failed": 1}
    assert mine["steps"]["delay/waiting"] == 1 and mine["steps"]["send/created"] == 2


async def test_without_a_runner_the_overdue_run_shows_its_age(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await define_each_ending(conn)
    await conn.fetchval(
        "SELECT pgnotify.trigger('done', 'ada', start_at => now() - interval '1 hour')"
    )
    await trigger(conn, "done")  # due now as well: the oldest is the one that counts
    await conn.execute("SELECT pgnotify.set_batching('thread', interval '5 minutes', 3)")
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, body, "
        "batch_key) VALUES ('inapp', 'ada', 'ada', 'thread', 'x', 'doc-1')"
    )

    def seen(text: str) -> bool:
        return (sample(text, "pgnotify_workflow_oldest_overdue_seconds") or 0) >= 3600

    settings = worker_settings(
        workflows=False,
        queue_metrics_interval=0.2,
        console_admin_password=ADMIN,
        console_viewer_password=VIEWER,
    )
    async with running(settings) as service, client() as http:
        base = f"http://127.0.0.1:{service.http_port}"
        text = await scrape_until(http, base + "/metrics", seen)
        status = await (await http.get(base + "/status")).json()
        assert (await log_in(http, base, VIEWER)).status == 303
        async with http.get(base + "/console/?fragment=1") as page:
            overview = await page.text()
    # the console's overview has the same figures
    shown = dict(re.findall(r'<td class="n[^"]*" data-count="(\w+)">([^<]*)</td>', overview))
    assert shown["due"] == "2" and shown["delayed"] == "0" and shown["waiting_send"] == "0"
    assert shown["oldest_overdue"] == "60 min" and shown["batch_windows_open"] == "1"

    overdue = sample(text, "pgnotify_workflow_oldest_overdue_seconds")
    assert overdue is not None and 3600 <= overdue < 3660
    assert sample(text, "pgnotify_workflow_runs_waiting", '{state="due"}') == 2
    assert sample(text, "pgnotify_batch_windows_open") == 1
    assert sample(text, "pgnotify_workflow_runs_started_total") == 0
    section = status["workflows"]
    assert section["runner_enabled"] is False
    assert section["runs_waiting"] == {"due": 2, "delayed": 0, "waiting_send": 0}
    assert 3600 <= section["oldest_overdue_seconds"] < 3660
    assert section["batch_windows_open"] == 1


async def test_throttled_sends_are_counted_by_channel_and_action(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute("SELECT pgnotify.set_throttle('promo', 2, interval '1 day', 'drop')")
    ids = await send_four(conn)
    async with (
        running(worker_settings()) as service,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        await wait_rows(conn, ids, {"sent", "skipped"}, service)
        text = await (await http.get(f"http://127.0.0.1:{service.http_port}/metrics")).text()
        status = await (await http.get(f"http://127.0.0.1:{service.http_port}/status")).json()
    assert sample(text, "pgnotify_throttled_total", '{action="drop",channel="inapp"}') == 2
    assert status["workflows"]["this_worker"]["throttled"] == {"inapp/drop": 2}


# --- retention -----------------------------------------------------------------------------------


async def age(conn: asyncpg.Connection, run_id: int, days: int) -> None:
    """Make a run (and its steps) look `days` old: created then, finished then if finished."""
    await conn.execute(
        "UPDATE pgnotify.workflow_runs SET created_at = now() - make_interval(days => $2 + 1), "
        "finished_at = CASE WHEN status <> 'running' THEN now() - make_interval(days => $2) END "
        "WHERE id = $1",
        run_id,
        days,
    )


async def test_retention_deletes_old_finished_runs_and_keeps_referenced_ones(
    dsn: str, conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    await define_each_ending(conn)
    await define(conn, "long", [{"name": "wait", "kind": "delay", "days": 366}])
    pool = await dbmod.create_pool(dsn, min_size=1, max_size=2)
    try:
        runner = WorkflowRunner(pool, "w")
        runs = {name: await trigger(conn, flow) for name, flow in (
            ("old_done", "halt"), ("old_cancelled", "later"), ("old_ref", "done"),
            ("old_failed", "halt"), ("older_failed", "halt"), ("recent_done", "halt"),
            ("old_running", "long"),
        )}  # fmt: skip
        await settle(runner)
    finally:
        await pool.close()
    await conn.execute("SELECT pgnotify.cancel_run($1::bigint)", runs["old_cancelled"])
    await conn.execute(
        "UPDATE pgnotify.workflow_runs SET status = 'failed' WHERE id = ANY($1)",
        [runs["old_failed"], runs["older_failed"]],
    )
    for name, days in (
        ("old_done", 40),
        ("old_cancelled", 40),
        ("old_ref", 40),
        ("old_failed", 40),
        ("older_failed", 100),
        ("recent_done", 1),
        ("old_running", 40),
    ):
        await age(conn, runs[name], days)
    # old_ref's in-app notification failed 40 days ago: kept 90 days, and its run with it
    made = await conn.fetchval(
        "SELECT notification_id FROM pgnotify.workflow_run_steps WHERE run_id = $1",
        runs["old_ref"],
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'failed', "
        "updated_at = now() - interval '40 days' WHERE id = $1",
        made,
    )
    steps_before = await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_run_steps")
    env = {"PGNOTIFY_DATABASE_URL": dsn}

    # the dry run counts by the same rules (old_ref stays: its notification is kept) and deletes
    # nothing
    result = await asyncio.to_thread(cli, "purge", "--dry-run", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "would delete 3 finished workflow run(s)" in result.stdout.splitlines()
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_runs") == len(runs)

    # the worker role runs retention (the job's command) and cannot DELETE runs itself
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    notices: list[str] = []
    worker.add_log_listener(lambda _c, m: notices.append(str(getattr(m, "message", ""))))
    try:
        await worker.execute("CALL pgnotify.apply_retention(batch => 2)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await worker.execute("DELETE FROM pgnotify.workflow_runs")
    finally:
        await worker.close()

    left = {r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.workflow_runs")}
    kept = {"old_ref", "old_failed", "recent_done", "old_running"}
    assert left == {runs[n] for n in kept}, {n: runs[n] in left for n in runs}
    gone = [runs[n] for n in ("old_done", "old_cancelled", "older_failed")]
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.workflow_run_steps WHERE run_id = ANY($1)", gone
        )
        == 0
    )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_run_steps") < steps_before
    deleted = [int(n.rsplit(" ", 1)[1]) for n in notices if "workflow runs deleted" in n]
    assert sum(deleted) == 3 and all(d <= 2 for d in deleted), notices

    # once its notification is past retention too, the run goes in the same call (the CLI's)
    await conn.execute(
        "UPDATE pgnotify.notifications SET updated_at = now() - interval '100 days' WHERE id = $1",
        made,
    )
    # the dry run knows that the notification goes first, and the run with it
    result = await asyncio.to_thread(cli, "purge", "--dry-run", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "would delete 1 notification(s)",
        "would delete 1 finished workflow run(s)",
    ]
    result = await asyncio.to_thread(cli, "purge", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        "deleted 1 notification(s)",
        "deleted 1 finished workflow run(s)",
    ]
    left = {r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.workflow_runs")}
    assert left == {runs[n] for n in ("old_failed", "recent_done", "old_running")}


# --- a million runs ------------------------------------------------------------------------------

RUNS = 1_000_000
RUNNING = 100_000


@pytest.mark.timeout(600)
async def test_a_million_runs_gauges_read_only_the_running_ones(conn: asyncpg.Connection) -> None:
    await define(conn, "big", [{"name": "wait", "kind": "delay", "minutes": 10}])
    await conn.execute(
        f"""
        SET session_replication_role = replica;
        INSERT INTO pgnotify.workflow_runs (workflow, version, user_id, status, current_step,
                                            next_at, created_at, finished_at, waiting_on)
        SELECT 'big', 1, 'u' || g, 'completed', NULL, now() - interval '1 day',
               now() - interval '1 day', now() - interval '1 day', NULL
        FROM generate_series(1, {RUNS - RUNNING}) g;
        INSERT INTO pgnotify.workflow_runs (workflow, version, user_id, status, current_step,
                                            next_at, waiting_on)
        SELECT 'big', 1, 'u' || g, 'running', 'wait',
               CASE WHEN g % 100 = 0 THEN now() - interval '2 minutes'
                    ELSE now() + interval '10 minutes' END,
               CASE WHEN g % 100 = 0 THEN NULL WHEN g % 2 = 0 THEN 'send' ELSE 'delay' END
        FROM generate_series(1, {RUNNING}) g;
        RESET session_replication_role;
        """
    )
    await conn.execute("VACUUM ANALYZE pgnotify.workflow_runs")
    plan = await explain(conn, queries.WORKFLOW_STATUS)
    scans = [n for n in plan if n.get("Relation Name") == "workflow_runs"]
    assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), scans
    assert any(n.get("Index Name") == "workflow_runs_due_idx" for n in plan), plan
    started = time.monotonic()
    row = await conn.fetchrow(queries.WORKFLOW_STATUS)
    elapsed = time.monotonic() - started
    print(f"workflow_status over {RUNS} runs ({RUNNING} running): {elapsed * 1000:.1f} ms")
    assert row is not None
    assert (row["due"], row["delayed"], row["waiting_send"]) == (1000, 50_000, 49_000)
    assert 119 <= row["oldest_overdue_seconds"] < 180
    # 100,000 running runs counted through their partial index: far below the 5 s /status allows
    assert elapsed < 2.0, elapsed

    # retention over a million runs none of which is due stops at the first batch
    started = time.monotonic()
    await conn.execute("CALL pgnotify.apply_retention()")
    elapsed = time.monotonic() - started
    print(f"apply_retention over {RUNS} runs, none due: {elapsed * 1000:.1f} ms")
    assert elapsed < 2.0
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.workflow_runs") == RUNS
