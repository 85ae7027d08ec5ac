"""Behind PgBouncer in transaction mode (the usual Supabase/Heroku set-up): the pool and migrations
go through the pooler, LISTEN goes direct; a LISTEN through the pooler is caught by /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.cli import ALL_VERSIONS, cli
from tests.support.db import PgServer, fill, wait_rows
from tests.support.pgbouncer import PgBouncer, find_pgbouncer
from tests.support.webhooks import WebhookSink
from tests.support.worker import running


@pytest.fixture
def bouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    binary = find_pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    if pg_server.cluster is None:
        pytest.skip("needs the suite's own cluster (PGNOTIFY_TEST_DSN points elsewhere)")
    bouncer = PgBouncer(binary, pg_server.cluster.port).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def via(bouncer: PgBouncer, dsn: str) -> str:
    return bouncer.dsn(dsn.rsplit("/", 1)[1])


async def enqueue(dsn: str, url: str, count: int) -> list[int]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await fill(conn, url, count)
    finally:
        await conn.close()


async def test_pool_through_the_pooler_listen_direct(
    bouncer: PgBouncer,
    dsn: str,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    pooled = via(bouncer, dsn)
    settings = worker_settings(
        database_url=pooled,
        listen_database_url=dsn,
        statement_cache_size=0,
        pool_max_size=8,
        poll_interval=30.0,  # delivery within the test's bounds proves the wake-up came by NOTIFY
        jobs=True,
    )
    async with running(settings, timeout=20) as service:
        ids = await enqueue(pooled, webhook_sink.url, 200)  # a producer through the pooler too
        conn = await asyncpg.connect(dsn)
        try:
            rows = await wait_rows(conn, ids, {"sent"}, service, timeout=20)
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as http:
            ready = await http.get(f"http://127.0.0.1:{service.http_port}/readyz")
            assert ready.status == 200, await ready.text()
    assert len(rows) == 200
    assert sorted(r.json()["data"]["n"] for r in webhook_sink.requests) == list(range(1, 201))
    assert "prepared statement" not in bouncer.log_text()


async def test_a_listen_through_the_pooler_is_not_ready_but_polling_delivers(
    bouncer: PgBouncer,
    dsn: str,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    pooled = via(bouncer, dsn)
    settings = worker_settings(
        database_url=pooled,
        listen_database_url=pooled,  # the mistake: LISTEN through a transaction pooler
        statement_cache_size=0,
        poll_interval=0.2,
    )
    async with running(settings, timeout=20, wait_listening=False) as service:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{service.http_port}/readyz"
            async with asyncio.timeout(15):
                while True:
                    response = await http.get(url)
                    body = await response.json()
                    if response.status == 503 and any(
                        "NOTIFY round trip" in reason for reason in body["reasons"]
                    ):
                        break
                    await asyncio.sleep(0.1)
        assert any("PGNOTIFY_LISTEN_DATABASE_URL" in reason for reason in body["reasons"])
        assert not service.listening.is_set()
        ids = await enqueue(pooled, webhook_sink.url, 5)
        conn = await asyncpg.connect(dsn)
        try:
            await wait_rows(conn, ids, {"sent"}, service, timeout=10)  # polling still delivers
        finally:
            await conn.close()


async def test_three_migrations_at_once_through_the_pooler(
    bouncer: PgBouncer, empty_dsn: str
) -> None:
    env = {"PGNOTIFY_DATABASE_URL": via(bouncer, empty_dsn), "PGNOTIFY_STATEMENT_CACHE_SIZE": "0"}
    runs = await asyncio.gather(*(asyncio.to_thread(cli, "migrate", env=env) for _ in range(3)))
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    reported = [line for run in runs for line in run.stdout.splitlines()]
    applied = [
        v
        for line in reported
        if "applied migrations:" in line
        for v in line.split(": ")[1].split(", ")
    ]
    assert sorted(applied) == ALL_VERSIONS.split(", ")  # each version applied by exactly one
    conn = await asyncpg.connect(empty_dsn)
    try:
        versions = await conn.fetchval(
            "SELECT array_agg(version ORDER BY version) FROM pgnotify.schema_migrations"
        )
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        )
    finally:
        await conn.close()
    assert [f"{v:04d}" for v in versions] == ALL_VERSIONS.split(", ")
    assert held == 0  # no session lock left on a pooled server connection
