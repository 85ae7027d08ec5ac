"""Fixtures: a real PostgreSQL (started here unless PGNOTIFY_TEST_DSN is set), a migrated template
database copied per test, a fake webhook receiver on 127.0.0.1, and an in-process worker.

The helpers these fixtures use live in tests/support/ (db, webhooks, worker); tests import them
from there, never from this file."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters import migrate
from pgnotify_worker.config import Settings
from tests.support.db import PgServer, _admin, scratch_database
from tests.support.pgcluster import TempCluster
from tests.support.roles import LoginAs, login_roles
from tests.support.webhooks import WebhookSink
from tests.support.worker import settings_for

TEMPLATE_DB = "pgnotify_template"

# Provider API clients honour HTTP(S)_PROXY: the fakes on 127.0.0.1 are reached directly, whatever
# proxy the machine running the tests has (tests/test_proxies.py sets its own).
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)


# --- the server ---------------------------------------------------------------------------------


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


@pytest.fixture
def worker_settings(dsn: str) -> Callable[..., Settings]:
    return lambda **overrides: settings_for(dsn, **overrides)


@pytest.fixture
def caplog_all(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
async def login_as(dsn: str) -> AsyncIterator[LoginAs]:
    """login_as('pgnotify_producer', ...): a new LOGIN role in those groups; returns its DSN."""
    async with login_roles(dsn) as make:
        yield make
