"""promtool checks a live scrape of /metrics: names, help texts and types follow Prometheus rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.adapters.metrics import Metrics
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
    assert b"process_resident_memory_bytes" in scrape  # the process collector is registered
    assert b"_created" not in scrape  # disable_created_metrics()
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_the_registry_has_process_metrics_and_no_created_series() -> None:
    metrics = Metrics("w-test")
    metrics.job_runs.labels("retention", "succeeded").inc()
    metrics.job_failures.labels("retention").set(0)
    metrics.notifications.labels("webhook", "webhook", "sent").inc()
    text = metrics.render().decode()
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_resident_memory_bytes"):
        assert f"\n{name} " in text, name
    assert "python_info{" in text
    assert "_created" not in text
    # `job` is Prometheus' target label: the periodic job's name is periodic_job
    assert 'pgnotify_job_runs_total{periodic_job="retention",status="succeeded"} 1.0' in text
    assert 'pgnotify_job_consecutive_failures{periodic_job="retention"} 0.0' in text
    assert not re.search(r'[{,]job="', text)
