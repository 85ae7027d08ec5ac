"""An in-process worker for tests: settings with fast timers, and a Service run in this loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pgnotify_worker.config import Settings, load_settings
from pgnotify_worker.service import Service
from tests.support.webhooks import WEBHOOK_SECRET


def settings_for(dsn: str, **overrides: Any) -> Settings:
    """Settings for a worker under test: fast timers, loopback webhooks allowed, any free port."""
    values: dict[str, Any] = {
        "database_url": dsn,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_allowed_networks": "127.0.0.0/8",
        "poll_interval": 1.0,
        "reap_interval": 0.5,
        "lease_seconds": 10.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "listener_ping_interval": 0.5,
        "queue_metrics_interval": 0.2,
        "grace_period": 5.0,
        "log_format": "text",
        # one loopback sink stands for many customers' endpoints in most tests: no per-endpoint
        # cap there (tests/test_destinations.py sets its own)
        "destination_concurrency": 10_000,
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
