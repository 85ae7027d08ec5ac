"""Replicas: three worker processes share one database and 20,000 webhooks. Each is delivered
exactly once, the load is shared, and a replica killed with SIGKILL mid-run loses nothing: its
in-flight rows come back through lease expiry, and only those can arrive twice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web

from tests.support.procs import WorkerProcess
from tests.support.webhooks import WEBHOOK_SECRET

pytestmark = pytest.mark.slow

TOTAL = 20_000
REPLICAS = 3
CONCURRENCY = 50
SEQ = re.compile(rb'"seq":\s*(\d+)')


class IdCounter:
    """A webhook receiver that does nothing but count webhook-ids (and note each payload seq):
    cheap enough that 20,000 requests cost the workers, not the receiver. (tests.support.webhooks'
    webhook_sink keeps every request and scans them all on each one: quadratic at this size.)"""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.seqs: set[int] = set()
        self.url = ""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        self.counts[webhook_id] += 1
        if match := SEQ.search(body):
            self.seqs.add(int(match.group(1)))
        if self._waiters:
            distinct = len(self.counts)
            for waiter in [w for w in self._waiters if w[0] <= distinct]:
                self._waiters.remove(waiter)
                if not waiter[1].done():
                    waiter[1].set_result(None)
        return web.Response(status=200)

    async def wait_distinct(self, count: int, timeout: float) -> None:
        """Until `count` distinct webhook-ids arrived (bounded)."""
        if len(self.counts) >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise AssertionError(
                f"receiver saw {len(self.counts)} distinct webhook-ids, not {count}, in {timeout}s"
            ) from None

    def duplicates(self) -> set[str]:
        return {key for key, n in self.counts.items() if n > 1}


@pytest.fixture
async def receiver() -> AsyncIterator[IdCounter]:
    counter = IdCounter()
    app = web.Application()
    app.router.add_post("/hook", counter.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # 150 connections open at once
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    counter.url = f"http://127.0.0.1:{port}/hook"
    yield counter
    await runner.cleanup()


def replica_env(dsn: str, name: str, **extra: str) -> dict[str, str]:
    env = {
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_WORKER_ID": name,  # the name in locked_by and events.worker
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": "0",
        "PGNOTIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={CONCURRENCY}",
        # one receiver stands for many customers' endpoints here: no per-endpoint cap (rows
        # over it would go back to the queue, as retry_scheduled events)
        "PGNOTIFY_DESTINATION_CONCURRENCY": str(CONCURRENCY),
        "PGNOTIFY_POLL_INTERVAL": "1",
        "PGNOTIFY_RETRY_BASE_SECONDS": "0.05",
        "PGNOTIFY_RETRY_MAX_SECONDS": "0.2",
        "PGNOTIFY_JOBS": "false",
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def replicas(dsn: str, **extra: str) -> AsyncIterator[list[WorkerProcess]]:
    """Three worker processes, all ready (listening) before the block starts."""
    workers = [WorkerProcess(replica_env(dsn, f"replica-{i}", **extra)) for i in range(REPLICAS)]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        await asyncio.gather(*(w.ready(timeout=30) for w in workers))
        yield workers
    finally:
        for worker in workers:
            await worker.close()


async def fill(conn: asyncpg.Connection, url: str) -> None:
    """TOTAL webhooks in one statement (one NOTIFY wakes every replica), payload {"seq": n}."""
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
        url,
        TOTAL,
    )


async def wait_all_sent(conn: asyncpg.Connection, timeout: float) -> None:
    """Until every row is sent. Other processes write the rows, so there is no event to await
    here: poll (the receiver has seen every id by now; this waits for the last write-backs and,
    after a kill, for the expired leases)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = dict(
            await conn.fetch("SELECT status, count(*) FROM pgnotify.notifications GROUP BY 1")
        )
        if counts == {"sent": TOTAL}:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not all sent after {timeout}s: {counts}")
        await asyncio.sleep(0.1)


async def sent_by_worker(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT worker, count(*) FROM pgnotify.events WHERE event = 'sent' GROUP BY worker"
    )
    return {r["worker"]: r["count"] for r in rows}


async def id_of_webhook(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT id, 'pgn_' || uid AS webhook_id FROM pgnotify.notifications")
    return {r["webhook_id"]: r["id"] for r in rows}


async def test_three_replicas_deliver_each_notification_exactly_once(
    dsn: str, conn: asyncpg.Connection, receiver: IdCounter
) -> None:
    async with replicas(dsn) as workers:
        started = time.monotonic()
        await fill(conn, receiver.url)
        await receiver.wait_distinct(TOTAL, timeout=60)
        await wait_all_sent(conn, timeout=15)
        elapsed = time.monotonic() - started
        for worker in workers:
            assert worker.proc is not None and worker.proc.returncode is None  # none crashed

    assert receiver.seqs == set(range(1, TOTAL + 1))
    assert set(receiver.counts) == set(await id_of_webhook(conn))  # the rows' own webhook-ids
    assert receiver.duplicates() == set()  # exactly once
    assert sum(receiver.counts.values()) == TOTAL
    sent = await sent_by_worker(conn)
    assert sum(sent.values()) == TOTAL
    assert set(sent) == {f"replica-{i}" for i in range(REPLICAS)}
    for name, count in sent.items():  # a fair share is a third; each did a real part of it
        assert count >= TOTAL // 10, f"{name} sent only {count} of {TOTAL}: {sent}"
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.events WHERE event NOT IN ('claimed', 'sent')"
        )
        == 0
    )  # no retries, no expired leases
    print(f"\n{TOTAL} webhooks by {REPLICAS} replicas in {elapsed:.1f}s; per replica {sent}")


async def test_a_replica_killed_mid_run_loses_nothing(
    dsn: str, conn: asyncpg.Connection, receiver: IdCounter
) -> None:
    lease = {"PGNOTIFY_LEASE_SECONDS": "2", "PGNOTIFY_REAP_INTERVAL": "0.3"}
    async with replicas(dsn, **lease) as workers:
        victim, survivors = workers[0], workers[1:]
        started = time.monotonic()
        await fill(conn, receiver.url)
        await receiver.wait_distinct(TOTAL * 3 // 10, timeout=60)
        victim.kill()
        assert await victim.wait() == -signal.SIGKILL
        # What the dead replica held: leased rows nobody may touch until the lease runs out.
        held = {
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM pgnotify.notifications "
                "WHERE status = 'processing' AND locked_by = 'replica-0'"
            )
        }
        await receiver.wait_distinct(TOTAL, timeout=60)
        await wait_all_sent(conn, timeout=15)
        elapsed = time.monotonic() - started
        for worker in survivors:
            assert worker.proc is not None and worker.proc.returncode is None
        reaped_by_survivor = any("leases_expired" in w.actions() for w in survivors)

    assert held, "the kill caught no sends in flight"
    # none lost
    assert receiver.seqs == set(range(1, TOTAL + 1))
    ids = await id_of_webhook(conn)
    assert set(receiver.counts) == set(ids)
    # the dead replica's rows came back through lease expiry, and only its rows did
    expired = await conn.fetch(
        "SELECT notification_id, worker FROM pgnotify.events WHERE event = 'lease_expired'"
    )
    assert {r["worker"] for r in expired} == {"replica-0"}
    assert {r["notification_id"] for r in expired} == held
    assert reaped_by_survivor
    # duplicates: only rows the killed replica held a lease on — its sends in flight (at most
    # CONCURRENCY) plus sends that had finished but whose outcome was not yet written back
    # (the batched write-back): those reached the receiver and go out again after expiry.
    duplicated = {ids[key] for key in receiver.duplicates()}
    assert duplicated <= held
    assert max(receiver.counts.values()) <= 2
    # every row has exactly one outcome written, whoever sent it
    sent = await sent_by_worker(conn)
    assert sum(sent.values()) == TOTAL
    assert all(sent.get(w, 0) >= TOTAL // 10 for w in ("replica-1", "replica-2")), sent
    print(
        f"\n{TOTAL} webhooks, replica-0 killed at 30%: {elapsed:.1f}s; in flight at the kill "
        f"{len(held)}, delivered twice {len(duplicated)}; per replica {sent}"
    )
