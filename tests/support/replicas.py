"""Helpers for multi-process tests: a cheap webhook receiver that counts webhook-ids, and the
environment of one worker replica."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
from collections.abc import AsyncIterator

from aiohttp import web

from tests.support.webhooks import WEBHOOK_SECRET

SEQ = re.compile(rb'"seq":\s*(\d+)')


class IdCounter:
    """A webhook receiver that does nothing but count webhook-ids (and note each payload seq):
    cheap enough that 20,000 requests cost the workers, not the receiver. (tests.support.webhooks'
    webhook_sink keeps every request and scans them all on each one: quadratic at this size.)"""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # answer after a random 0..delay seconds (a slow receiver)
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
        if self.delay:
            await asyncio.sleep(random.random() * self.delay)
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


@contextlib.asynccontextmanager
async def counting_receiver(delay: float = 0.0) -> AsyncIterator[IdCounter]:
    """An IdCounter served on 127.0.0.1."""
    counter = IdCounter(delay)
    app = web.Application()
    app.router.add_post("/hook", counter.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # 150 connections open at once
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    counter.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield counter
    finally:
        await runner.cleanup()


def replica_env(dsn: str, name: str, concurrency: int = 50, **extra: str) -> dict[str, str]:
    env = {
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_WORKER_ID": name,  # the name in locked_by and events.worker
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": "0",
        "PGNOTIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={concurrency}",
        # one receiver stands for many customers' endpoints here: no per-endpoint cap (rows
        # over it would go back to the queue, as retry_scheduled events)
        "PGNOTIFY_DESTINATION_CONCURRENCY": str(concurrency),
        "PGNOTIFY_POLL_INTERVAL": "1",
        "PGNOTIFY_RETRY_BASE_SECONDS": "0.05",
        "PGNOTIFY_RETRY_MAX_SECONDS": "0.2",
        "PGNOTIFY_JOBS": "false",
    }
    env.update(extra)
    return env
