"""Chaos: three replicas, a slow receiver, replicas SIGKILLed and replaced again and again (and, in
`make soak`, SIGTERMs and PostgreSQL restarts too). Counted at the receiver: nothing lost, nothing
stuck, and a notification arrives twice only when a lease of it expired (its sender died)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import asyncpg
import pytest

from tests.support.db import PgServer
from tests.support.procs import WorkerProcess
from tests.support.replicas import counting_receiver, replica_env

pytestmark = pytest.mark.slow

# CI runs a short version; `make soak` sets these higher (see the Makefile).
ROWS = int(os.environ.get("PGNOTIFY_CHAOS_ROWS", "2000"))
KILLS = int(os.environ.get("PGNOTIFY_CHAOS_KILLS", "4"))
TERMS = int(os.environ.get("PGNOTIFY_CHAOS_TERMS", "1"))
RESTARTS = int(os.environ.get("PGNOTIFY_CHAOS_DB_RESTARTS", "0"))
LEASE = {
    "PGNOTIFY_LEASE_SECONDS": "2",
    "PGNOTIFY_REAP_INTERVAL": "0.3",
    "PGNOTIFY_GRACE_PERIOD": "3",
}


async def status_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return dict(await conn.fetch("SELECT status, count(*) FROM pgnotify.notifications GROUP BY 1"))


async def test_replicas_killed_again_and_again_lose_nothing_and_duplicate_only_expired_leases(
    pg_server: PgServer, dsn: str, conn: asyncpg.Connection
) -> None:
    rng = random.Random(20261128)
    generation = 0

    def spawn(slot: int) -> WorkerProcess:
        nonlocal generation
        generation += 1
        return WorkerProcess(replica_env(dsn, f"r{slot}-g{generation}", 20, **LEASE))

    async with counting_receiver(delay=0.05) as receiver:
        workers = [spawn(i) for i in range(3)]
        await asyncio.gather(*(w.start() for w in workers))
        await asyncio.gather(*(w.ready(timeout=30) for w in workers))
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
            receiver.url,
            ROWS,
        )
        faults = ["kill"] * KILLS + ["term"] * TERMS + ["restart"] * RESTARTS
        rng.shuffle(faults)
        started = time.monotonic()
        try:
            for i, fault in enumerate(faults):
                # spread the faults over the run: wait for the next slice of deliveries
                await receiver.wait_distinct(ROWS * (i + 1) // (len(faults) + 2), timeout=120)
                if fault == "restart" and pg_server.cluster is not None:
                    await asyncio.to_thread(pg_server.cluster.stop, "fast")
                    await asyncio.to_thread(pg_server.cluster.start)
                    conn = await asyncpg.connect(dsn)
                    continue
                slot = rng.randrange(len(workers))
                victim = workers[slot]
                if fault == "kill":
                    victim.kill()
                    assert await victim.wait() == -signal.SIGKILL
                else:
                    victim.signal(signal.SIGTERM)
                    assert await victim.wait() == 0  # a graceful stop exits 0
                await victim.close()
                workers[slot] = spawn(slot)
                await workers[slot].start()
                await workers[slot].ready(timeout=30)
            await receiver.wait_distinct(ROWS, timeout=180)
            deadline = time.monotonic() + 60
            while (counts := await status_counts(conn)) != {"sent": ROWS}:
                assert time.monotonic() < deadline, f"stuck: {counts}"
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
        finally:
            for worker in workers:
                await worker.close()

    ids = {
        r["webhook_id"]: r["id"]
        for r in await conn.fetch(
            "SELECT id, 'pgn_' || uid AS webhook_id FROM pgnotify.notifications"
        )
    }
    assert receiver.seqs == set(range(1, ROWS + 1))  # lost: 0
    assert set(receiver.counts) == set(ids)
    expired = {
        r["notification_id"]
        for r in await conn.fetch(
            "SELECT notification_id FROM pgnotify.events WHERE event = 'lease_expired'"
        )
    }
    duplicated = {ids[key] for key in receiver.duplicates()}
    assert duplicated <= expired  # a second delivery only after its sender's lease expired
    print(
        f"\nchaos: {ROWS} webhooks, {KILLS} SIGKILL, {TERMS} SIGTERM, {RESTARTS} db restarts in "
        f"{elapsed:.1f}s; leases expired {len(expired)}, delivered twice {len(duplicated)}"
    )
