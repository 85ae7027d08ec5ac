"""Fixtures: a real PostgreSQL (started here unless PGNOTIFY_TEST_DSN is set), a migrated template
database copied per test, a fake webhook receiver on 127.0.0.1, and an in-process worker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters import migrate
from pgnotify_worker.config import Settings, load_settings
from pgnotify_worker.service import Service
from tests.support.pgcluster import TempCluster

TEMPLATE_DB = "pgnotify_template"
LOOPBACK_NETWORKS = "127.0.0.0/8"  # where the fake receivers listen
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-secret-0123456789abcdef!").decode()


# --- the server ---------------------------------------------------------------------------------


@dataclass
class PgServer:
    """The admin DSN of the test server, and the cluster when the suite started it."""

    admin_dsn: str
    cluster: TempCluster | None

    def dsn(self, database: str) -> str:
        base, _, _ = self.admin_dsn.rpartition("/")
        return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    explicit = os.environ.get("PGNOTIFY_TEST_DSN")
    if explicit:
        yield PgServer(explicit, None)
        return
    cluster = TempCluster().start()
    try:
        yield PgServer(cluster.dsn(), cluster)
    finally:
        cluster.destroy()


async def _admin(server: PgServer) -> asyncpg.Connection:
    return await asyncpg.connect(server.admin_dsn)


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> str:
    """A database migrated once; each test gets a copy (CREATE DATABASE ... TEMPLATE)."""

    async def build() -> None:
        admin = await _admin(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(pg_server.dsn(TEMPLATE_DB))
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return TEMPLATE_DB


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


@pytest.fixture
async def dsn(pg_server: PgServer, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    async with scratch_database(pg_server, "t", template_db) as url:
        yield url


@pytest.fixture
async def empty_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    async with scratch_database(pg_server, "e", None) as url:
        yield url


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database that decodes json/jsonb."""
    connection = await asyncpg.connect(dsn)
    await dbmod._init_connection(connection)
    yield connection
    await connection.close()


# --- a fake webhook receiver ----------------------------------------------------------------------


@dataclass
class Received:
    """One request the receiver saw."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Received, int], Awaitable[web.StreamResponse] | web.StreamResponse]


@dataclass
class WebhookSink:
    """An aiohttp app on 127.0.0.1 that records requests and answers as the test says."""

    requests: list[Received] = field(default_factory=list)
    responder: Responder | None = None
    url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def for_id(self, webhook_id: str) -> list[Received]:
        return [r for r in self.requests if r.headers.get("webhook-id") == webhook_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            request.path_qs, dict(request.headers), await request.read(), time.monotonic()
        )
        self.requests.append(received)
        seen = len(self.for_id(received.headers.get("webhook-id", "")))
        async with self._changed:
            self._changed.notify_all()
        if self.responder is None:
            return web.json_response({"ok": True})
        answer = self.responder(received, seen)
        if asyncio.iscoroutine(answer):
            return await answer
        return answer  # type: ignore[return-value]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Until at least `count` requests arrived (bounded)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= count)
        return self.requests


@pytest.fixture
async def webhook_sink() -> AsyncIterator[WebhookSink]:
    sink = WebhookSink()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sink.url = f"http://127.0.0.1:{port}"
    yield sink
    await runner.cleanup()


# --- an in-process worker -------------------------------------------------------------------------


def test_settings(dsn: str, **overrides: Any) -> Settings:
    """Settings for a worker under test: fast timers, loopback webhooks allowed, any free port."""
    values: dict[str, Any] = {
        "database_url": dsn,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_allowed_networks": LOOPBACK_NETWORKS,
        "poll_interval": 1.0,
        "reap_interval": 0.5,
        "lease_seconds": 10.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "listener_ping_interval": 0.5,
        "queue_metrics_interval": 0.2,
        "grace_period": 5.0,
        "log_format": "text",
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, timeout: float = 15.0, *, wait_listening: bool = True
) -> AsyncIterator[Service]:
    """Run a Service in this event loop until the block ends, then stop it gracefully."""
    listen = settings.listen_database_url
    service = Service(
        settings,
        settings.database_url.get_secret_value(),  # type: ignore[union-attr]
        listen.get_secret_value() if listen is not None else None,
    )
    task = asyncio.create_task(service.run(install_signals=False))
    try:
        async with asyncio.timeout(timeout):
            ready = asyncio.create_task(service.ready.wait())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises the start-up error
        if settings.listen and wait_listening:
            async with asyncio.timeout(timeout):
                await service.listening.wait()
        yield service
    finally:
        service.stop()
        async with asyncio.timeout(timeout + settings.grace_period):
            await task


@pytest.fixture
def worker_settings(dsn: str) -> Callable[..., Settings]:
    return lambda **overrides: test_settings(dsn, **overrides)


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


@pytest.fixture
def caplog_all(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog
