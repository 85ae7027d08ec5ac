"""The test PostgreSQL server, scratch databases, and waiting for rows to reach a status."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from pgnotify_worker.service import Service
from tests.support.pgcluster import TempCluster

LOOPBACK_NETWORKS = "127.0.0.0/8"  # where the fake receivers listen


@dataclass
class PgServer:
    """The admin DSN of the test server, and the cluster when the suite started it."""

    admin_dsn: str
    cluster: TempCluster | None

    def dsn(self, database: str) -> str:
        base, _, _ = self.admin_dsn.rpartition("/")
        return f"{base}/{database}"


async def _admin(server: PgServer) -> asyncpg.Connection:
    return await asyncpg.connect(server.admin_dsn)


@contextlib.asynccontextmanager
async def scratch_database(
    server: PgServer, prefix: str, template: str | None
) -> AsyncIterator[str]:
    """A database for one test (a copy of `template`, or empty), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin = await _admin(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
        # the INSERT check refuses loopback webhook URLs unless allowed, as the worker does
        await admin.execute(
            f'ALTER DATABASE "{name}" SET pgnotify.webhook_allowed_networks = '
            f"'{LOOPBACK_NETWORKS}'"
        )
    finally:
        await admin.close()
    try:
        yield server.dsn(name)
    finally:
        admin = await _admin(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def fill(conn: asyncpg.Connection, url: str, count: int) -> list[int]:
    """`count` webhook rows to `url` in one INSERT (payload n = 1..count); their ids."""
    rows = await conn.fetch(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1, jsonb_build_object('n', g) FROM generate_series(1, $2) g RETURNING id",
        url,
        count,
    )
    return [r["id"] for r in rows]


async def wait_rows(
    conn: asyncpg.Connection,
    ids: list[int],
    statuses: set[str],
    service: Service | None = None,
    timeout: float = 10.0,
) -> list[asyncpg.Record]:
    """Until every row of `ids` is in one of `statuses`; wakes on each write-back of `service`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await conn.fetch(
            "SELECT * FROM pgnotify.notifications WHERE id = ANY($1) ORDER BY id", ids
        )
        if len(rows) == len(ids) and all(r["status"] in statuses for r in rows):
            return rows
        left = deadline - time.monotonic()
        if left <= 0:
            summary = {r["id"]: (r["status"], r["attempts"], r["last_error"]) for r in rows}
            raise AssertionError(f"rows not in {statuses} after {timeout}s: {summary}")
        if service is not None and service.worker is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.25)):
                    async with service.worker.progress:
                        await service.worker.progress.wait()
        else:
            await asyncio.sleep(min(left, 0.05))
