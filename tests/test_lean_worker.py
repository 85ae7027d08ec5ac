"""Memory (issue 13): a worker keeps resident only what its configuration uses. A webhook-only
worker, started by the CLI as in production, delivers a notification and stops; what it imported
on the way must not include the optional parts: phone-number metadata (SMS), Jinja2 (templates,
the console), the console's pages, aiosmtplib (SMTP), the OpenTelemetry API (no tracing set up)
or cryptography (Web Push, FCM). Each of these is ~0.3-2 MB of RSS (bench/results/memory.md)."""

from __future__ import annotations

import json
import signal

import asyncpg

from tests.support.procs import WorkerProcess
from tests.support.replicas import counting_receiver
from tests.support.webhooks import WEBHOOK_SECRET

OPTIONAL = (
    "phonenumbers",
    "jinja2",
    "markupsafe",
    "pgnotify_worker.core.sandbox",
    "pgnotify_worker.adapters.console.app",
    "aiosmtplib",
    "opentelemetry.trace",
    "cryptography",
)


async def test_a_webhook_only_worker_never_imports_the_optional_parts(
    dsn: str, conn: asyncpg.Connection
) -> None:
    env = {
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": "0",
    }
    worker = WorkerProcess(env, module="tests.support.module_probe")
    for name in [n for n in worker.env if n.startswith("OTEL_")]:
        del worker.env[name]  # tracing set up by the surrounding shell would (rightly) load it
    async with counting_receiver() as receiver:
        await worker.start("run")
        try:
            await worker.ready(timeout=60)
            await conn.execute(
                "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
                "VALUES ('webhook', $1, '{\"seq\": 1}')",
                receiver.url,
            )
            await receiver.wait_distinct(1, timeout=30)
            worker.signal(signal.SIGTERM)
            assert await worker.wait(30) == 0
        finally:
            await worker.close()
    line = next(text for text in worker.stdout if text.startswith("MODULES "))
    modules = set(json.loads(line.removeprefix("MODULES ")))
    assert "pgnotify_worker.delivery.worker" in modules  # the probe saw the running worker
    loaded = [
        name for name in OPTIONAL if any(m == name or m.startswith(name + ".") for m in modules)
    ]
    assert loaded == [], f"a webhook-only worker imported {loaded}"
