"""A pinned snapshot is visible: the oldest open transaction and the queue tables' dead rows are
gauges, refreshed with the queue depth (PGNOTIFY_QUEUE_METRICS_INTERVAL)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters.db import QueueStore
from pgnotify_worker.adapters.metrics import Metrics
from pgnotify_worker.config import Settings
from tests.support.worker import running


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await dbmod.create_pool(dsn, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def pinned(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session holding a REPEATABLE READ snapshot (a query ran in it)."""
    other = await asyncpg.connect(dsn)
    transaction = other.transaction(isolation="repeatable_read")
    await transaction.start()
    await other.fetchval("SELECT count(*) FROM pgnotify.notifications")
    yield other
    await transaction.rollback()
    await other.close()


def sample(text: str, name: str, labels: str = "") -> float | None:
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def test_the_refresh_reports_a_pinned_snapshot(
    pool: asyncpg.Pool, pinned: asyncpg.Connection, conn: asyncpg.Connection
) -> None:
    metrics = Metrics("w-1")
    metrics.database(await QueueStore(pool, "w-1").database_health())
    assert metrics.oldest_transaction._value.get() > 0
    # an xid assigned after the snapshot was taken ages it
    await conn.fetchval("SELECT pgnotify.enqueue('email', 'a@b.co', subject => 's', body => 'x')")
    metrics.database(await QueueStore(pool, "w-1").database_health())
    assert metrics.oldest_xmin._value.get() >= 1
    text = metrics.render().decode()
    assert sample(text, "pgnotify_oldest_transaction_age_seconds")
    assert sample(text, "pgnotify_oldest_xmin_age_transactions")


async def test_nothing_open_reports_zero(pool: asyncpg.Pool) -> None:
    metrics = Metrics("w-1")
    metrics.database(await QueueStore(pool, "w-1").database_health())
    assert metrics.oldest_transaction._value.get() == 0
    assert metrics.oldest_xmin._value.get() == 0


async def test_dead_rows_of_the_queue_tables_are_counted(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 's', body => 'x') FROM generate_series(1, 20)"
    )
    await conn.execute("DELETE FROM pgnotify.notifications")
    if conn.get_server_version().major >= 15:  # else the idle backend reports them within ~10 s
        await conn.execute("SELECT pg_stat_force_next_flush()")
    metrics = Metrics("w-1")
    deadline = time.monotonic() + 15
    while True:
        metrics.database(await QueueStore(pool, "w-1").database_health())
        dead = metrics.dead_tuples.labels("notifications")._value.get()
        if dead >= 20 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert dead >= 20
    assert 'pgnotify_queue_dead_tuples{table="events"}' in metrics.render().decode()


async def test_the_running_worker_exports_the_age_of_a_pinned_snapshot(
    worker_settings: Callable[..., Settings], pinned: asyncpg.Connection
) -> None:
    async with (
        running(worker_settings(queue_metrics_interval=0.2)) as service,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{service.http_port}/metrics"
        deadline = time.monotonic() + 10  # a few refreshes at most
        age = None
        while time.monotonic() < deadline:
            age = sample(
                await (await http.get(url)).text(), "pgnotify_oldest_transaction_age_seconds"
            )
            if age:
                break
            await asyncio.sleep(0.1)
    assert age is not None and age > 0


async def test_what_a_role_without_pg_read_all_stats_sees(
    dsn: str, conn: asyncpg.Connection, pinned: asyncpg.Connection
) -> None:
    """The documented limit: other roles' xact_start is hidden (the age reads 0), their
    backend_xmin is not (the xid age still grows); pg_read_all_stats shows both."""
    role = f"watcher_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'w'")
    try:
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 's', body => 'x')"
        )  # an xid
        for granted in (False, True):
            if granted:
                await conn.execute(f"GRANT pg_read_all_stats TO {role}")
            watcher = await asyncpg.create_pool(dsn, user=role, password="w", min_size=1)
            try:
                metrics = Metrics("w-1")
                metrics.database(await QueueStore(watcher, "w-1").database_health())
            finally:
                await watcher.close()
            assert metrics.oldest_xmin._value.get() >= 1
            assert (metrics.oldest_transaction._value.get() > 0) is granted
    finally:
        await conn.execute(f"DROP ROLE {role}")
