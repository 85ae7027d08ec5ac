"""Rows fail alone and attempts count real sends: an undecodable row, a paused provider, a
template that renders empty, a database outage longer than the lease."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.config import Settings
from tests.support.db import PgServer, wait_rows
from tests.support.webhooks import Received, WebhookSink
from tests.support.worker import running

DONE = {"sent", "failed", "dead"}
# what the BEFORE INSERT trigger would have filled in
DEFAULTS = "status, max_attempts, run_at"
VALUES = "'queued', 5, now()"


async def insert_unchecked(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    """Insert as an older schema or a superuser's UPDATE could have: validation triggers off."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        nid: int = await conn.fetchval(sql, *args)
    await conn.execute("SELECT pg_notify('pgnotify', 'webhook')")
    return nid


async def test_a_row_the_worker_cannot_decode_fails_alone_and_spends_no_other_attempt(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    good = [
        await conn.fetchval(
            "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, priority => 0)",
            webhook_sink.url,
        )
        for _ in range(7)
    ]
    ancient = await insert_unchecked(
        conn,
        "INSERT INTO pgnotify.notifications (channel, recipient, payload, priority, status, "
        "max_attempts, run_at) VALUES ('webhook', $1, '{}', 9, 'queued', 5, '4713-01-01 BC') "
        "RETURNING id",
        webhook_sink.url,
    )
    poison = [
        await insert_unchecked(
            conn,
            "INSERT INTO pgnotify.notifications (channel, recipient, payload, expires_at, "
            f"priority, {DEFAULTS}) VALUES ('webhook', $1, '{{}}', '10000-01-01', 9, {VALUES}) "
            "RETURNING id",
            webhook_sink.url,
        ),
        await insert_unchecked(
            conn,
            "INSERT INTO pgnotify.notifications (channel, recipient, payload, priority, "
            f"{DEFAULTS}) VALUES ('webhook', $1, $2::text::jsonb, 9, {VALUES}) RETURNING id",
            webhook_sink.url,
            '{"a":' * 3000 + "1" + "}" * 3000,
        ),
    ]
    async with running(worker_settings()) as service:
        await wait_rows(conn, good, DONE, service)
    rows = await conn.fetch(  # not SELECT *: the test's own driver cannot read those dates either
        "SELECT id, status, attempts, last_error FROM pgnotify.notifications WHERE id = ANY($1)",
        [*good, ancient, *poison],
    )
    by_id = {r["id"]: r for r in rows}
    for nid in [
        *good,
        ancient,
    ]:  # a run_at from 4713 BC is merely overdue: the claim never reads it
        assert (by_id[nid]["status"], by_id[nid]["attempts"]) == ("sent", 1)
    for nid in poison:
        assert by_id[nid]["status"] == "failed"
        assert (
            "the worker can handle" in by_id[nid]["last_error"]
            or "nested" in (by_id[nid]["last_error"])
        )
    codes = await conn.fetch(
        "SELECT DISTINCT error_code FROM pgnotify.events WHERE notification_id = ANY($1) "
        "AND event = 'failed'",
        poison,
    )
    assert [r["error_code"] for r in codes] == ["undecodable"]
    assert len(webhook_sink.requests) == 8


async def test_429s_spend_no_attempt_only_real_failures_do(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    def answer(request: Received, _n: int) -> web.Response:
        seen = len(webhook_sink.for_id(request.headers["webhook-id"]))
        if seen <= 4:  # four 429s in a row, more than max_attempts
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(status=200)

    webhook_sink.responder = answer
    ids = [
        await conn.fetchval(
            "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, max_attempts => 3)",
            webhook_sink.url,
        )
        for _ in range(3)
    ]
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, ids, DONE, service, timeout=20)
    for row in rows:
        assert (row["status"], row["attempts"]) == ("sent", 1), dict(row)
    assert len(webhook_sink.requests) == 15


@pytest.mark.parametrize(
    ("body", "why"),
    [("   {{ '' }}\n ", "empty_body"), ("{{ ''|attr('format') }}", "template_error")],
)
async def test_a_webhook_body_that_renders_empty_is_not_sent(
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
    body: str,
    why: str | None,
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, body => $2)",
        webhook_sink.url,
        body,
    )
    async with running(worker_settings()) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "failed"
    if why is not None:
        code = await conn.fetchval(
            "SELECT error_code FROM pgnotify.events WHERE notification_id = $1 AND event = 'failed'",
            nid,
        )
        assert code == why
    assert webhook_sink.requests == []


@pytest.mark.slow
async def test_an_outage_longer_than_the_lease_sends_nothing_twice(
    pg_server: PgServer,
    dsn: str,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    cluster = pg_server.cluster
    if cluster is None:
        pytest.skip("needs the suite's own cluster (PGNOTIFY_TEST_DSN points elsewhere)")

    async def slow(_r: Received, _n: int) -> web.Response:
        await asyncio.sleep(3.0)  # still sending when the database goes away
        return web.Response(status=200)

    webhook_sink.responder = slow
    conn = await asyncpg.connect(dsn)
    ids = [
        r["id"]
        for r in await conn.fetch(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', $1, '{}' FROM generate_series(1, 20) RETURNING id",
            webhook_sink.url,
        )
    ]
    await conn.close()
    settings = dict(lease_seconds=2.0, reap_interval=0.2, channel_concurrency="webhook=20")
    async with running(worker_settings(**settings), timeout=60) as owner:
        await webhook_sink.wait_for(20)  # the owner holds all 20, sending
        async with running(worker_settings(**settings), timeout=60) as other:
            await asyncio.to_thread(cluster.stop, "fast")
            await asyncio.sleep(3.5)  # longer than the 2 s lease
            await asyncio.to_thread(cluster.start)
            conn = await asyncpg.connect(dsn)
            try:
                rows = await wait_rows(conn, ids, {"sent"}, owner, timeout=40)
            finally:
                await conn.close()
            assert other.worker is not None
    assert len(rows) == 20
    sends = collections.Counter(r.headers["webhook-id"] for r in webhook_sink.requests)
    assert sends == collections.Counter({f"pgn_{r['uid']}": 1 for r in rows})
