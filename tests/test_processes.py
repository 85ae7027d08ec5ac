"""`run --processes N`: one command, N full workers (one per core). Two processes drain a backlog
with each row delivered exactly once and both doing part of it; one SIGTERM to the parent stops
both gracefully, and the parent exits with them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pgnotify_worker.processes import child_env
from tests.support.procs import WorkerProcess
from tests.support.replicas import IdCounter, counting_receiver, replica_env

TOTAL = 2_000


@pytest.fixture
async def receiver() -> AsyncIterator[IdCounter]:
    async with counting_receiver(delay=0.002) as counter:  # a little slow: both must share
        yield counter


async def until_logged(worker: WorkerProcess, action: str, count: int, timeout: float) -> None:
    """Until `count` log lines with this action (the children share the parent's stderr)."""
    deadline = time.monotonic() + timeout
    while worker.actions().count(action) < count:
        assert worker.proc is not None and worker.proc.returncode is None, worker.logs[-5:]
        assert time.monotonic() < deadline, f"{action} x{count} not logged: {worker.logs[-5:]}"
        await asyncio.sleep(0.05)


def test_each_child_gets_its_own_port_and_name() -> None:
    env = child_env({"PGNOTIFY_PROCESSES": "3", "X": "y"}, 2, 9090, "pod-a")
    assert env["PGNOTIFY_PROCESSES"] == "1" and env["X"] == "y"
    assert (env["PGNOTIFY_HTTP_PORT"], env["PGNOTIFY_WORKER_ID"]) == ("9092", "pod-a-2")
    anyport = child_env({}, 1, 0, None)
    assert "PGNOTIFY_HTTP_PORT" not in anyport and "PGNOTIFY_WORKER_ID" not in anyport


async def test_two_processes_drain_exactly_once_and_stop_on_one_sigterm(
    dsn: str, conn: asyncpg.Connection, receiver: IdCounter
) -> None:
    worker = WorkerProcess(replica_env(dsn, "multi", 20))
    await worker.start("run", "--processes", "2")
    try:
        await until_logged(worker, "ready", 2, timeout=60)
        await until_logged(worker, "listener_connected", 2, timeout=30)
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
            receiver.url,
            TOTAL,
        )
        await receiver.wait_distinct(TOTAL, timeout=120)
        async with asyncio.timeout(30):
            while await conn.fetchval(
                "SELECT count(*) FROM pgnotify.notifications WHERE status <> 'sent'"
            ):
                await asyncio.sleep(0.05)
        assert receiver.duplicates() == set()  # exactly once
        assert receiver.seqs == set(range(1, TOTAL + 1))
        sent = dict(
            await conn.fetch(
                "SELECT worker, count(*) FROM pgnotify.events WHERE event = 'sent' GROUP BY 1"
            )
        )
        assert set(sent) == {"multi-0", "multi-1"}, sent  # both processes did part of it
        assert sum(sent.values()) == TOTAL

        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout=60) == 0
    finally:
        await worker.close()
    assert worker.actions().count("stopped") == 2  # each child stopped gracefully


def test_more_than_one_process_needs_a_database_url() -> None:
    """The embedded PostgreSQL serves one worker: refused at once, with what to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGNOTIFY_")}
    out = subprocess.run(
        [sys.executable, "-m", "pgnotify_worker", "run", "--processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "needs PGNOTIFY_DATABASE_URL" in out.stderr


async def test_children_stop_when_the_parent_is_killed(dsn: str) -> None:
    """No orphans: SIGKILL on the supervisor (an OOM kill) still stops both children, gracefully."""
    worker = WorkerProcess(replica_env(dsn, "orphan", 5))
    await worker.start("run", "--processes", "2")
    try:
        await until_logged(worker, "ready", 2, timeout=60)
        worker.kill()
        deadline = time.monotonic() + 60
        while worker.actions().count("stopped") < 2:
            assert time.monotonic() < deadline, worker.logs[-5:]
            await asyncio.sleep(0.05)
        assert await worker.wait(timeout=30) == -signal.SIGKILL  # its pipes close: children gone
    finally:
        await worker.close()
