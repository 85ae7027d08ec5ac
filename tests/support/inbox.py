"""The inbox API and feed served on 127.0.0.1 for tests (adapters/inbox_http.py), with tokens
signed as an app's backend would sign them, and inbox rows written with SQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from pgnotify_worker.adapters import db, http_server
from pgnotify_worker.adapters.inbox_http import MAX_STREAMS, MAX_STREAMS_PER_USER, FeedHub, InboxApi
from pgnotify_worker.adapters.metrics import Metrics
from pgnotify_worker.core import app_tokens

SECRET = b"inbox-test-secret-0123456789abcdef"


@dataclass
class Served:
    """A running inbox API: its base URL, the API object, a client session."""

    url: str
    api: InboxApi
    hub: FeedHub
    pool: asyncpg.Pool
    http: aiohttp.ClientSession
    metrics: Metrics

    def token(self, user_id: str, ttl: int = 900, **claims: Any) -> str:
        """A user token as the app's backend signs it."""
        return app_tokens.issue(SECRET, user_id, int(time.time()), ttl, **claims)

    def auth(self, user_id: str) -> dict[str, str]:
        """The Authorization header of a fresh token for `user_id`."""
        return {"Authorization": f"Bearer {self.token(user_id)}"}


async def _nothing() -> dict[str, Any]:
    return {}


async def _ready() -> list[str]:
    return []


@contextlib.asynccontextmanager
async def serve(
    dsn: str,
    *,
    cors_origins: Sequence[str] = (),
    heartbeat: float = 15.0,
    clock: Callable[[], float] = time.time,
    audience: str | None = None,
    max_streams: int = MAX_STREAMS,
    max_streams_per_user: int = MAX_STREAMS_PER_USER,
) -> AsyncIterator[Served]:
    """The worker's HTTP app with the inbox routes and /metrics, on a free port, until the
    block ends."""
    pool = await db.create_pool(dsn, min_size=1, max_size=5)
    hub = FeedHub(dsn, max_streams=max_streams, max_streams_per_user=max_streams_per_user)
    metrics = Metrics("w-inbox-test")
    api = InboxApi(
        SECRET,
        lambda: pool,
        hub,
        cors_origins=cors_origins,
        heartbeat=heartbeat,
        clock=clock,
        audience=audience,
        metrics=metrics,
    )
    app = http_server.make_app(_nothing, _ready, metrics.render, (api.routes,))
    runner, port = await http_server.start(app, "127.0.0.1", 0)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield Served(f"http://127.0.0.1:{port}", api, hub, pool, http, metrics)
    finally:
        await http.close()
        await runner.cleanup()
        await pool.close()


async def add(
    conn: asyncpg.Connection,
    user_id: str,
    title: str = "Hello",
    *,
    category: str | None = None,
    count: int = 1,
) -> list[int]:
    """Insert `count` inbox rows for `user_id` (as the in-app provider does); their ids."""
    rows = await conn.fetch(
        """
        INSERT INTO pgnotify.inbox (notification_id, user_id, category, title, body, data)
        SELECT nextval('pgnotify.test_notification_ids'), $1, $2, $3 || CASE WHEN $4 > 1
               THEN ' ' || g ELSE '' END, 'body', '{"k": 1}'::jsonb
        FROM generate_series(1, $4) AS g
        RETURNING id
        """,
        user_id,
        category,
        title,
        count,
    )
    return [r["id"] for r in rows]


async def prepare(conn: asyncpg.Connection) -> None:
    """The sequence `add` takes notification ids from (inbox rows need a unique one)."""
    await conn.execute(
        "CREATE SEQUENCE IF NOT EXISTS pgnotify.test_notification_ids START 1000000000"
    )


async def ready(server: Served) -> None:
    """Wait until the feed's LISTEN connection is up."""
    await asyncio.wait_for(server.hub.listening.wait(), 10)
