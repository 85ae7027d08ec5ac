"""Claiming ahead under a backlog (delivery/worker.py, ChannelState): a worker whose claim came
back full leases up to one more channel-load of rows beyond its free slots, starts each of them
the moment a send ends, renews them like rows in flight, and hands them back on shutdown. Never
for a rate-limited channel, and never more than `limit` rows ahead."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
from aiohttp import web

from tests.support.webhooks import Received, WebhookSink
from tests.support.worker import running, settings_for

LIMIT = 4


async def backlog(conn: asyncpg.Connection, url: str, rows: int) -> list[int]:
    found = await conn.fetch(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1 || '/' || g, jsonb_build_object('seq', g) "
        "FROM generate_series(1, $2) g RETURNING id",
        url,
        rows,
    )
    return [r["id"] for r in found]


async def processing(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status = 'processing'"
        )
    )


async def until_processing(conn: asyncpg.Connection, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await processing(conn)) != count:
        assert time.monotonic() < deadline, f"{seen} rows processing, waited for {count}"
        await asyncio.sleep(0.02)


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Until the worker's own state says so (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await asyncio.sleep(0.01)


def gate(sink: WebhookSink) -> asyncio.Event:
    """Every request hangs until the returned event is set."""
    opened = asyncio.Event()

    async def hold(_r: Received, _n: int) -> web.Response:
        await opened.wait()
        return web.json_response({"ok": True})

    sink.responder = hold
    return opened


async def test_a_backlog_is_claimed_ahead_and_each_row_sent_once(
    conn: asyncpg.Connection, dsn: str, webhook_sink: WebhookSink
) -> None:
    opened = gate(webhook_sink)
    ids = await backlog(conn, webhook_sink.url, 40)
    settings = settings_for(dsn, channel_concurrency=f"webhook={LIMIT}")
    async with running(settings) as service:
        await webhook_sink.wait_for(LIMIT)
        assert service.worker is not None
        state = service.worker.channels["webhook"]
        # LIMIT sends hang at the receiver, LIMIT more rows are leased ahead of a free slot
        await until(lambda: len(state.ahead) == LIMIT, "rows claimed ahead")
        assert state.in_flight == LIMIT
        assert await processing(conn) == 2 * LIMIT
        assert len(webhook_sink.requests) == LIMIT  # the rows ahead wait for a slot
        # the rows ahead are leased by this worker like the rows in flight (renewed, reaped)
        leased = await conn.fetch(
            "SELECT locked_by, locked_until > now() AS live FROM pgnotify.notifications "
            "WHERE status = 'processing'"
        )
        assert {(r["locked_by"], r["live"]) for r in leased} == {(settings.worker_id, True)}
        opened.set()
        deadline = time.monotonic() + 20
        most_ahead = most_in_flight = 0
        while await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status <> 'sent'"
        ):
            most_ahead = max(most_ahead, len(state.ahead))
            most_in_flight = max(most_in_flight, state.in_flight)
            assert time.monotonic() < deadline, "the backlog was not drained in 20 s"
            await asyncio.sleep(0.005)
    assert most_ahead <= LIMIT and most_in_flight <= LIMIT  # one channel-load ahead at most
    sent = Counter(r.headers["webhook-id"] for r in webhook_sink.requests)
    assert len(sent) == len(ids) and set(sent.values()) == {1}
    attempts = await conn.fetch("SELECT DISTINCT attempts FROM pgnotify.notifications")
    assert [r["attempts"] for r in attempts] == [1]


async def test_rows_claimed_ahead_are_handed_back_on_shutdown_unspent(
    conn: asyncpg.Connection, dsn: str, webhook_sink: WebhookSink
) -> None:
    opened = gate(webhook_sink)
    ids = await backlog(conn, webhook_sink.url, 20)
    try:
        async with running(
            settings_for(dsn, channel_concurrency=f"webhook={LIMIT}", grace_period=0.3)
        ) as service:
            await webhook_sink.wait_for(LIMIT)
            assert service.worker is not None
            state = service.worker.channels["webhook"]
            await until(lambda: len(state.ahead) == LIMIT, "rows claimed ahead")
        # stop: no row ahead is started; the hanging sends are cut after the grace period
    finally:
        opened.set()
    assert len(webhook_sink.requests) == LIMIT
    rows = await conn.fetch("SELECT status, attempts FROM pgnotify.notifications ORDER BY id")
    assert {(r["status"], r["attempts"]) for r in rows} == {("queued", 0)}
    released = await conn.fetchval(
        "SELECT count(*) FROM pgnotify.events WHERE event = 'released' "
        "AND notification_id = ANY($1)",
        ids,
    )
    assert released == 2 * LIMIT  # the cut sends and the rows ahead, nothing else


async def test_a_rate_limited_channel_never_claims_ahead(
    conn: asyncpg.Connection, dsn: str, webhook_sink: WebhookSink
) -> None:
    opened = gate(webhook_sink)
    await backlog(conn, webhook_sink.url, 20)
    # tokens are paid at the claim: rows leased ahead would hold tokens they cannot use yet
    settings = settings_for(
        dsn, channel_concurrency=f"webhook={LIMIT}", rate_limits="webhook=1000/100"
    )
    try:
        async with running(settings) as service:
            await webhook_sink.wait_for(LIMIT)
            await until_processing(conn, LIMIT)
            assert service.worker is not None
            # give the claim loop every chance to claim more (it runs on each wake)
            for _ in range(5):
                service.worker.wake_all()
                await asyncio.sleep(0.05)
            assert await processing(conn) == LIMIT
            assert not service.worker.channels["webhook"].ahead
            opened.set()
    finally:
        opened.set()


async def test_only_a_full_claim_starts_claiming_ahead(
    conn: asyncpg.Connection, dsn: str, webhook_sink: WebhookSink
) -> None:
    """Fewer rows than free slots: no backlog, nothing held back from other replicas; a claim
    that comes back full starts claiming ahead."""
    opened = gate(webhook_sink)
    try:
        async with running(settings_for(dsn, channel_concurrency=f"webhook={LIMIT}")) as service:
            await backlog(conn, webhook_sink.url, LIMIT - 1)
            await webhook_sink.wait_for(LIMIT - 1)
            assert service.worker is not None
            state = service.worker.channels["webhook"]
            assert not state.backlogged and not state.ahead
            await backlog(conn, webhook_sink.url, 3)  # one slot free, three rows
            await webhook_sink.wait_for(LIMIT)
            # the claim of one row came back full: the next claim took the other two ahead
            await until(lambda: len(state.ahead) == 2, "two rows claimed ahead")
            assert await processing(conn) == LIMIT + 2
            opened.set()
    finally:
        opened.set()


async def test_a_more_urgent_row_goes_before_the_rows_waiting_ahead(
    conn: asyncpg.Connection, dsn: str, webhook_sink: WebhookSink
) -> None:
    opened = gate(webhook_sink)
    await backlog(conn, webhook_sink.url, 3 * LIMIT)
    try:
        async with running(settings_for(dsn, channel_concurrency=f"webhook={LIMIT}")) as service:
            await webhook_sink.wait_for(LIMIT)
            assert service.worker is not None
            state = service.worker.channels["webhook"]
            await until(lambda: len(state.ahead) == LIMIT, "rows claimed ahead")
            urgent = await conn.fetchval(
                "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, priority => 9)",
                f"{webhook_sink.url}/urgent",
            )
            # release one send at a time: a slot frees, a row ahead starts, until room for a
            # claim; the urgent row is claimed then and goes before every row still waiting
            hold_one = asyncio.Event()

            async def one_by_one(_r: Received, _n: int) -> web.Response:
                await hold_one.wait()
                return web.json_response({"ok": True})

            webhook_sink.responder = one_by_one
            opened.set()
            hold_one.set()
            await webhook_sink.wait_for(3 * LIMIT + 1, timeout=20)
    finally:
        opened.set()
    paths = [r.path for r in webhook_sink.requests]
    # the first LIMIT went out before it existed; it goes out before the last rows of the backlog
    assert paths.index("/urgent") < len(paths) - LIMIT, paths
    assert urgent is not None
