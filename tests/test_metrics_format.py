"""promtool checks a live scrape of /metrics: names, help texts and types follow Prometheus rules."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.webhooks import WebhookSink
from tests.support.worker import running

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (make lint installs it as root)"
)
async def test_promtool_accepts_a_live_scrape(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    nid = await conn.fetchval("SELECT pgnotify.enqueue('webhook', $1)", webhook_sink.url)
    async with running(worker_settings()) as service:
        await wait_rows(conn, [nid], {"sent"}, service)
        async with aiohttp.ClientSession() as http:
            scrape = await (await http.get(f"http://127.0.0.1:{service.http_port}/metrics")).read()
    assert b"pgnotify_notifications_total" in scrape  # a scrape with traffic in it
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
