"""The CLI an operator expects: show, tail, replay (bulk, --dry-run), purge (--dry-run),
migrate --dry-run, send-test, psql (the password never on a command line)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import asyncpg
import pytest

from pgnotify_worker.cli import psql_target
from pgnotify_worker.config import Settings
from tests.support.cli import cli
from tests.support.worker import running


async def acli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    result = await asyncio.to_thread(cli, *args, env=env, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


async def test_show_replay_and_purge(dsn: str, conn: asyncpg.Connection) -> None:
    env = {"PGNOTIFY_DATABASE_URL": dsn}
    enqueue = "SELECT pgnotify.enqueue($1, $2, subject => 'Hi', body => 'x', category => $3)"
    dead = await conn.fetchval(enqueue, "email", "ada@example.com", "billing")
    failed = await conn.fetchval(enqueue, "webhook", "https://example.com/h", "orders")
    old = await conn.fetchval(enqueue, "email", "bob@example.com", "billing")
    await conn.execute(
        """UPDATE pgnotify.notifications SET status = CASE id WHEN $1 THEN 'dead' ELSE 'failed' END,
                  last_error = 'HTTP 500 from upstream', attempts = 3 WHERE id = ANY($2)""",
        dead,
        [dead, failed],
    )
    await conn.execute(
        """UPDATE pgnotify.notifications SET status = 'sent', attempts = 1, sent_at = now(),
                  updated_at = now() - interval '40 days' WHERE id = $1""",
        old,
    )

    code, out, err = await acli("show", str(dead), env=env)
    assert code == 0, err
    assert "status" in out and "dead" in out and "HTTP 500 from upstream" in out
    assert "ada@example.com" not in out  # addresses are masked, as in logs
    timeline = out.split("timeline:", 1)[1]
    assert "queued" in timeline
    code, _out, err = await acli("show", "999999", env=env)
    assert code == 1 and "does not exist" in err

    code, out, err = await acli("replay", "--dry-run", env=env)
    assert code == 0, err
    assert f"#{dead}" in out and f"#{failed}" in out and "would requeue 2" in out
    statuses = "SELECT status FROM pgnotify.notifications WHERE id = $1"
    assert await conn.fetchval(statuses, dead) == "dead"  # a dry run changes nothing

    code, out, err = await acli("replay", "--channel", "email", "--since", "1h", env=env)
    assert code == 0, err
    assert out.strip() == f"requeued 1 notification(s): {dead}"
    assert await conn.fetchval(statuses, dead) == "queued"
    assert await conn.fetchval(statuses, failed) == "failed"
    replayed = (
        "SELECT count(*) FROM pgnotify.events WHERE notification_id = $1 AND event = 'replayed'"
    )
    assert await conn.fetchval(replayed, dead) == 1
    code, out, _err = await acli("replay", "--category", "nothing-here", env=env)
    assert out.strip() == "requeued 0 notification(s)"

    code, out, err = await acli("purge", "--dry-run", env=env)
    assert code == 0, err
    assert "would delete 1 notification(s)" in out
    assert await conn.fetchval(statuses, old) == "sent"
    code, out, err = await acli("purge", env=env)
    assert code == 0, err
    assert out.strip() == "deleted 1 notification(s)"
    assert await conn.fetchval(statuses, old) is None
    assert await conn.fetchval(statuses, failed) == "failed"  # failed rows are kept 90 days


async def test_migrate_dry_run_lists_what_is_pending(empty_dsn: str) -> None:
    env = {"PGNOTIFY_DATABASE_URL": empty_dsn}
    code, out, err = await acli("migrate", "--dry-run", env=env)
    assert code == 0, err
    assert out.splitlines()[0] == "would apply 0001_core"
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('pgnotify.notifications')") is None
    finally:
        await conn.close()
    assert (await acli("migrate", env=env))[0] == 0
    assert (await acli("migrate", "--dry-run", env=env))[1].strip() == "schema is up to date"


async def test_send_test_waits_for_the_outcome_and_tail_follows_events(
    dsn: str, worker_settings: Callable[..., Settings]
) -> None:
    env = {"PGNOTIFY_DATABASE_URL": dsn}
    async with running(worker_settings(channels="email,webhook", email_providers="console")):
        tail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgnotify_worker", "tail", "--count", "1", "--timeout", "30",
            env={**{k: v for k, v in os.environ.items() if not k.startswith("PGNOTIFY_")}, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert tail.stderr is not None
        ready = await asyncio.wait_for(tail.stderr.readline(), 30)
        assert b"following events after" in ready

        code, out, err = await acli(
            "send-test", "--channel", "email", "--to", "ada@example.com", env=env
        )
        assert code == 0, err
        assert out.splitlines()[-1].endswith(": sent via console after 1 attempt(s)")

        lines, _ = await asyncio.wait_for(tail.communicate(), 30)
        assert tail.returncode == 0
        events = lines.decode().splitlines()
        # one event per attempt (schema 0015: the claim writes none; `show` has the claimed step)
        assert [line.split()[4] for line in events] == ["sent"], events

        # a channel no worker serves: the outcome never comes, and it says what to check
        code, _out, err = await acli(
            "send-test", "--channel", "sms", "--to", "+14155550123", "--timeout", "1", env=env
        )
        assert code == 1 and "still queued" in err and "is a worker running" in err

        code, out, _err = await acli("tail", "--last", "5", "--timeout", "0", env=env)
        assert code == 0 and len(out.splitlines()) == 1  # the one event there is


def test_psql_gets_the_password_through_the_environment_only() -> None:
    assert psql_target("postgresql://app:s%40cret@db:5432/app?sslmode=require") == (
        "postgresql://app@db:5432/app?sslmode=require",
        "s@cret",
    )
    assert psql_target("postgresql://app@db/app?password=pw&sslmode=disable") == (
        "postgresql://app@db/app?sslmode=disable",
        "pw",
    )
    assert psql_target("postgresql://postgres:@/postgres?host=/x/pgdata") == (
        "postgresql://postgres@/postgres?host=/x/pgdata",
        None,
    )


async def test_psql_opens_the_configured_database(dsn: str) -> None:
    if not any(os.access(os.path.join(p, "psql"), os.X_OK) for p in os.environ["PATH"].split(":")):
        pytest.skip("psql is not installed (Debian: postgresql-client)")
    code, out, err = await acli(
        "psql", "-tA", "-v", "ON_ERROR_STOP=1", "-c", "SELECT count(*) FROM pgnotify.notifications",
        env={"PGNOTIFY_DATABASE_URL": dsn},
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == "0"
