"""The autoscaler counts only what more replicas would send: pgnotify.sendable_backlog counts the
ready rows of channels some live worker can send (schema 0014), and pgnotify_scaler reads that and
nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.config import Settings
from tests.support.roles import LoginAs
from tests.support.worker import running

BACKLOG = "SELECT ready FROM pgnotify.sendable_backlog"


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await dbmod.create_pool(dsn, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def enqueue(conn: asyncpg.Connection, channel: str, count: int) -> None:
    recipient = {
        "webhook": "https://hooks.example.com/h",
        "email": "ada@example.com",
        "sms": "+14155550123",
    }[channel]
    for _ in range(count):
        await conn.fetchval(
            "SELECT pgnotify.enqueue($1, $2, subject => 's', body => 'x')", channel, recipient
        )


async def test_only_ready_rows_of_channels_a_live_worker_can_send_count(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await enqueue(conn, "webhook", 3)
    await enqueue(conn, "email", 2)
    await enqueue(conn, "sms", 1)
    await conn.fetchval(  # scheduled for later: not ready, never counted
        "SELECT pgnotify.enqueue('webhook', 'https://hooks.example.com/h', body => 'x', "
        "run_at => now() + interval '1 hour')"
    )
    assert await conn.fetchval(BACKLOG) == 0  # no worker has said anything yet

    # w-1 can send webhook, not email (no provider); nobody serves sms
    await QueueStore(pool, "w-1").channel_health({"webhook": True, "email": False}, 30.0)
    assert await conn.fetchval(BACKLOG) == 3
    # a worker whose word has expired (it stopped refreshing) counts for nothing
    await QueueStore(pool, "w-2").channel_health({"email": True, "sms": True}, -1.0)
    assert await conn.fetchval(BACKLOG) == 3
    # a live one that can send email adds its rows; w-1's refresh keeps its own row
    await QueueStore(pool, "w-3").channel_health({"email": True, "sms": False}, 30.0)
    await QueueStore(pool, "w-1").channel_health({"webhook": True, "email": False}, 30.0)
    assert await conn.fetchval(BACKLOG) == 5
    rows = await conn.fetch(
        "SELECT channel, worker, sendable FROM pgnotify.channel_health ORDER BY 1, 2"
    )
    assert [tuple(r) for r in rows] == [
        ("email", "w-1", False),
        ("email", "w-2", True),
        ("email", "w-3", True),
        ("sms", "w-2", True),
        ("sms", "w-3", False),
        ("webhook", "w-1", True),
    ]
    # a webhook paused on every worker stops counting
    await QueueStore(pool, "w-1").channel_health({"webhook": False, "email": False}, 30.0)
    assert await conn.fetchval(BACKLOG) == 2


async def test_long_dead_workers_rows_are_removed_by_the_others(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await QueueStore(pool, "gone").channel_health({"email": True}, -7200.0)
    await QueueStore(pool, "w-1").channel_health({"email": True}, 30.0)
    workers = await conn.fetch("SELECT worker FROM pgnotify.channel_health")
    assert [r["worker"] for r in workers] == ["w-1"]


async def wait_health(
    conn: asyncpg.Connection, worker: str, expected: dict[str, bool]
) -> dict[str, bool]:
    deadline = time.monotonic() + 10
    while True:
        rows = await conn.fetch(
            "SELECT channel, sendable FROM pgnotify.channel_health "
            "WHERE worker = $1 AND valid_until > now()",
            worker,
        )
        found = {r["channel"]: r["sendable"] for r in rows}
        if all(found.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def test_a_running_worker_keeps_its_channels_health_true(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(queue_metrics_interval=0.1)) as service:
        assert service.providers["email"].disabled_reason  # no email provider in tests
        found = await wait_health(conn, service.worker_id, {"webhook": True, "email": False})
        assert found["webhook"] is True
        assert found["email"] is False  # no provider: its rows never count

        # every webhook provider paused (circuit open): the channel stops counting
        breaker = service.providers["webhook"].slots[0].breaker
        breaker.failure(time.monotonic(), "test: paused", trip=True)
        found = await wait_health(conn, service.worker_id, {"webhook": False})
        assert found["webhook"] is False
        await enqueue(conn, "webhook", 2)  # not claimed while paused
        await enqueue(conn, "email", 2)
        assert await conn.fetchval(BACKLOG) == 0

        breaker.success()
        found = await wait_health(conn, service.worker_id, {"webhook": True})
        assert found["webhook"] is True


async def test_the_scaler_role_reads_the_view_and_nothing_else(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    await enqueue(conn, "webhook", 1)
    scaler = await asyncpg.connect(await login_as("pgnotify_scaler"))
    try:
        assert await scaler.fetchval(BACKLOG) == 0
        for sql in (
            "SELECT count(*) FROM pgnotify.notifications",
            "SELECT count(*) FROM pgnotify.channel_health",
            "SELECT count(*) FROM pgnotify.queue_status",
            "SELECT count(*) FROM pgnotify.events",
            "SELECT count(*) FROM pgnotify.contacts",
            "SELECT pgnotify.enqueue('webhook', 'https://hooks.example.com/h', body => 'x')",
            "INSERT INTO pgnotify.channel_health (channel, worker, sendable, valid_until) "
            "VALUES ('webhook', 'x', true, now() + interval '1 hour')",
            "INSERT INTO pgnotify.notifications (channel, recipient, body) "
            "VALUES ('webhook', 'https://hooks.example.com/h', 'x')",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await scaler.execute(sql)
        tables = await scaler.fetchval(
            "SELECT array_agg(c.relname ORDER BY c.relname) FROM pg_class c "
            "WHERE c.relnamespace = 'pgnotify'::regnamespace AND c.relkind IN ('r', 'v', 'm') "
            "AND has_table_privilege(c.oid, 'SELECT')"
        )
        assert tables == ["sendable_backlog"]
    finally:
        await scaler.close()
