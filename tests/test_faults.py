"""Faults: a worker killed mid-send, SIGTERM under load, a database restart. Real processes."""

from __future__ import annotations

import asyncio
import collections
import random
import signal
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.config import Settings
from tests.support.db import PgServer, fill, wait_rows
from tests.support.procs import WorkerProcess
from tests.support.webhooks import WEBHOOK_SECRET, Received, WebhookSink
from tests.support.worker import running

pytestmark = pytest.mark.slow


def worker_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": "0",
        "PGNOTIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_LEASE_SECONDS": "2",
        "PGNOTIFY_REAP_INTERVAL": "0.3",
        "PGNOTIFY_POLL_INTERVAL": "1",
        "PGNOTIFY_RETRY_BASE_SECONDS": "0.05",
        "PGNOTIFY_RETRY_MAX_SECONDS": "0.2",
        "PGNOTIFY_CHANNELS": "webhook",
    }
    env.update(extra)
    return env


async def test_sigkill_mid_send_loses_nothing(
    dsn: str, conn: asyncpg.Connection, webhook_sink: WebhookSink
) -> None:
    async def slow(_r: Received, _n: int) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(status=200)

    webhook_sink.responder = slow
    ids = await fill(conn, webhook_sink.url, 40)
    # no periodic jobs: their reap_leases (every minute, on the minute) could requeue the rows
    # before the worker's own reaper when the kill falls a lease before a minute boundary
    first = WorkerProcess(
        worker_env(dsn, PGNOTIFY_CHANNEL_CONCURRENCY="webhook=10", PGNOTIFY_JOBS="false")
    )
    second = WorkerProcess(worker_env(dsn, PGNOTIFY_JOBS="false"))
    try:
        await (await first.start()).ready()
        await webhook_sink.wait_for(12)  # sends are under way
        first.kill()
        assert await first.wait() == -signal.SIGKILL
        in_flight = await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status = 'processing'"
        )
        assert in_flight > 0  # the kill did catch sends in the middle
        await (await second.start()).ready()
        rows = await wait_rows(conn, ids, {"sent"}, timeout=30)
    finally:
        await first.close()
        await second.close()
    assert len(rows) == 40  # none lost
    per_id = collections.Counter(r.headers["webhook-id"] for r in webhook_sink.requests)
    assert set(per_id) == {f"pgn_{r['uid']}" for r in rows}
    duplicates = {key for key, n in per_id.items() if n > 1}
    assert len(duplicates) <= in_flight  # only rows caught mid-send can arrive twice
    expired = await conn.fetchval(
        "SELECT count(*) FROM pgnotify.events WHERE event = 'lease_expired'"
    )
    assert expired == in_flight
    assert "leases_expired" in second.actions()


async def test_sigterm_under_load_loses_and_duplicates_nothing(
    dsn: str, conn: asyncpg.Connection, webhook_sink: WebhookSink
) -> None:
    async def jittery(_r: Received, _n: int) -> web.Response:
        await asyncio.sleep(random.uniform(0, 0.05))
        return web.Response(status=200)

    webhook_sink.responder = jittery
    ids = await fill(conn, webhook_sink.url, 400)
    first = WorkerProcess(worker_env(dsn, PGNOTIFY_GRACE_PERIOD="5"))
    second = WorkerProcess(worker_env(dsn))
    try:
        await (await first.start()).ready()
        await webhook_sink.wait_for(100)
        first.signal(signal.SIGTERM)
        assert await first.wait(20) == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pgnotify.notifications WHERE status = 'processing'"
            )
            == 0
        )  # every claim was finished or handed back
        assert "stopped" in first.actions()
        await (await second.start()).ready()
        await wait_rows(conn, ids, {"sent"}, timeout=30)
    finally:
        await first.close()
        await second.close()
    per_id = collections.Counter(r.headers["webhook-id"] for r in webhook_sink.requests)
    assert len(per_id) == 400
    assert max(per_id.values()) == 1  # a graceful stop sends nothing twice


async def test_a_database_restart_is_survived(
    pg_server: PgServer,
    dsn: str,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    cluster = pg_server.cluster
    if cluster is None:
        pytest.skip("needs the suite's own cluster (PGNOTIFY_TEST_DSN points elsewhere)")

    async def slowish(_r: Received, _n: int) -> web.Response:
        await asyncio.sleep(0.02)
        return web.Response(status=200)

    webhook_sink.responder = slowish
    conn = await asyncpg.connect(dsn)
    before = await fill(conn, webhook_sink.url, 100)
    await conn.close()
    settings = worker_settings(channel_concurrency="webhook=5", lease_seconds=5.0)
    async with running(settings, timeout=60) as service:
        port = service.http_port
        async with aiohttp.ClientSession() as http:
            await webhook_sink.wait_for(10)
            await asyncio.to_thread(cluster.stop, "fast")  # every connection is cut
            async with asyncio.timeout(15):
                while (await http.get(f"http://127.0.0.1:{port}/readyz")).status != 503:
                    await asyncio.sleep(0.05)
            body = await (await http.get(f"http://127.0.0.1:{port}/readyz")).json()
            assert any("database" in reason or "listener" in reason for reason in body["reasons"])
            assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status == 200  # still alive
            await asyncio.to_thread(cluster.start)
            async with asyncio.timeout(30):
                await service.listening.wait()
                while (await http.get(f"http://127.0.0.1:{port}/readyz")).status != 200:
                    await asyncio.sleep(0.05)
        conn = await asyncpg.connect(dsn)
        try:
            after = await fill(conn, webhook_sink.url, 20)
            rows = await wait_rows(conn, before + after, {"sent"}, service, timeout=45)
        finally:
            await conn.close()
    assert len(rows) == 120
    delivered = {r.headers["webhook-id"] for r in webhook_sink.requests}
    assert delivered == {f"pgn_{r['uid']}" for r in rows}
    assert service.health.listener is not None and service.health.listener.reconnects >= 1
    assert "deadlock detected" not in cluster.log_text()
