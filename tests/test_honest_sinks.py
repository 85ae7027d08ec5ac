"""Nothing is "sent" that wasn't: with a real database and no provider, email, SMS and push rows
wait (and /status and the metrics say why); a dev sink is used only when chosen, and never takes a
row enqueued while a real provider served its channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import asyncpg

from pgnotify_worker.config import Settings
from pgnotify_worker.service import Service
from tests.support.db import wait_rows
from tests.support.webhooks import WebhookSink
from tests.support.worker import running


async def get(service: Service, path: str) -> str:
    url = f"http://127.0.0.1:{service.http_port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.text()


async def test_without_providers_email_sms_and_push_wait_and_say_why(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    ids = [
        await conn.fetchval(sql)
        for sql in (
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')",
            "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'x')",
            "SELECT pgnotify.enqueue('push', 'device-token-1', body => 'x')",
        )
    ]
    async with running(worker_settings(poll_interval=0.2)) as service:
        status = await get(service, "/status")
        metrics = await get(service, "/metrics")
        await asyncio.sleep(1.0)  # five polls: a channel that could send would have by now
    rows = await conn.fetch(
        "SELECT status, attempts, provider FROM pgnotify.notifications WHERE id = ANY($1)", ids
    )
    assert [(r["status"], r["attempts"], r["provider"]) for r in rows] == [("queued", 0, None)] * 3
    for channel in ("email", "sms", "push"):
        assert f'pgnotify_channel_enabled{{channel="{channel}"}} 0.0' in metrics
        assert f"PGNOTIFY_{channel.upper()}_PROVIDERS" in status
    assert 'pgnotify_channel_enabled{channel="webhook"} 1.0' in metrics


async def test_a_dev_sink_never_takes_a_row_enqueued_while_a_real_provider_served_it(
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    # enqueued for later, while a worker with the real webhook provider runs
    early = await conn.fetchval(
        "SELECT pgnotify.enqueue('webhook', $1, run_at => now() + interval '1 second')",
        webhook_sink.url,
    )
    async with running(worker_settings(channels="webhook")):
        pass  # it served the channel: rows enqueued until now are a real provider's
    # a dev-sink worker (the user chose the console for webhooks) starts afterwards
    async with running(
        worker_settings(channels="webhook", webhook_providers="console", poll_interval=0.2)
    ) as service:
        late = await conn.fetchval("SELECT pgnotify.enqueue('webhook', $1)", webhook_sink.url)
        await wait_rows(conn, [late], {"sent"}, service)
        await wait_rows(conn, [early], {"queued"}, service, timeout=5)  # due now
        await asyncio.sleep(1.0)  # five polls of a worker that must leave it alone
    rows = {
        r["id"]: (r["status"], r["provider"])
        for r in await conn.fetch("SELECT id, status, provider FROM pgnotify.notifications")
    }
    assert rows[late] == ("sent", "console")
    assert rows[early] == ("queued", None)  # waits for a real provider
    assert webhook_sink.requests == []
    # and a real provider takes it
    async with running(worker_settings(channels="webhook")) as service:
        await wait_rows(conn, [early], {"sent"}, service)
    assert len(webhook_sink.requests) == 1
