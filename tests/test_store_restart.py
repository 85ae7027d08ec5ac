"""A database restart under load: the store raises only its own errors (StoreUnavailable), never a
driver error, and every call works again once the server is back."""

from __future__ import annotations

import asyncio
import collections
import logging

import pytest

from pgnotify_worker.adapters import db
from pgnotify_worker.errors import StoreError, StoreUnavailable
from tests.support.db import PgServer

pytestmark = pytest.mark.slow


async def test_store_calls_survive_restarts_with_only_store_errors(
    pg_server: PgServer, dsn: str
) -> None:
    cluster = pg_server.cluster
    if cluster is None:
        pytest.skip("needs the suite's own cluster (PGNOTIFY_TEST_DSN points elsewhere)")
    logging.getLogger("asyncpg.pool").setLevel(logging.CRITICAL)  # its reconnect tracebacks
    pool = await db.create_pool(dsn, min_size=4, max_size=4, connect_timeout=2.0)
    store = db.QueueStore(pool, "restart-test")
    seen: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(5):
                    await store.queue_status()
                seen["ok"] += 1
            except StoreUnavailable:
                seen["unavailable"] += 1
                await asyncio.sleep(0.01)
            except StoreError as exc:  # the server reported an error (e.g. 57P01)
                seen[f"store:{exc.cause_type}"] += 1
                await asyncio.sleep(0.01)
            except Exception as exc:  # a driver error escaping the adapter: the bug
                seen[f"LEAKED {type(exc).__name__}: {exc}"] += 1

    try:
        tasks = [asyncio.create_task(hammer()) for _ in range(8)]
        for _ in range(3):
            await asyncio.sleep(0.4)
            await asyncio.to_thread(cluster.stop, "fast")
            await asyncio.to_thread(cluster.start)
        await asyncio.sleep(0.5)
        before = seen["ok"]
        async with asyncio.timeout(15):  # back to normal: calls succeed again
            while seen["ok"] < before + 50:
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await pool.close()
    assert not [k for k in seen if k.startswith("LEAKED")], seen
    assert seen["unavailable"] > 0  # the restarts were seen
