"""/metrics, /healthz, /readyz and /status, served from the worker's own event loop."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
ReadyFn = Callable[[], Awaitable[list[str]]]
MetricsFn = Callable[[], bytes]

STATUS: web.AppKey[StatusFn] = web.AppKey("status", StatusFn)  # type: ignore[arg-type]
READY: web.AppKey[ReadyFn] = web.AppKey("ready", ReadyFn)  # type: ignore[arg-type]
METRICS: web.AppKey[MetricsFn] = web.AppKey("metrics", MetricsFn)  # type: ignore[arg-type]


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    body = request.app[METRICS]()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers. It does not depend on the database (no restart storms)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: database reachable, listener healthy (when listening), not stopping."""
    reasons = await request.app[READY]()
    if reasons:
        return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
    return web.json_response({"status": "ready"})


async def status(request: web.Request) -> web.Response:
    """Everything an operator asks first, as JSON; no secrets, no recipients."""
    started = time.perf_counter()
    body = await request.app[STATUS]()
    body["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return web.json_response(body, dumps=lambda o: __import__("json").dumps(o, default=str))


def make_app(
    status_fn: StatusFn,
    ready_fn: ReadyFn,
    metrics_fn: MetricsFn,
    extra_routes: Sequence[Callable[[web.Application], None]] = (),
) -> web.Application:
    """The application (tests may serve it on their own runner)."""
    app = web.Application(client_max_size=1024 * 1024)  # provider reports are small
    app[STATUS] = status_fn
    app[READY] = ready_fn
    app[METRICS] = metrics_fn
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    for add in extra_routes:
        add(app)
    return app


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve on host:port; returns the runner and the bound port (port 0 picks a free one)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = port
    server = site._server  # aiohttp keeps the asyncio server here; the only way to read port 0
    sockets = getattr(server, "sockets", None) or []
    if sockets:
        bound = sockets[0].getsockname()[1]
    return runner, bound
