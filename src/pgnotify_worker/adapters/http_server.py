"""/metrics, /healthz, /readyz and /status, served from the worker's own event loop.

/healthz, /readyz and /metrics are open (probes and Prometheus reach them from outside the pod).
/status needs `Authorization: Bearer <PGNOTIFY_STATUS_TOKEN>` when a token is set, and answers
loopback clients only (kubectl port-forward / exec) when none is."""

from __future__ import annotations

import hmac
import ipaddress
import json
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
STATUS_TOKEN: web.AppKey[bytes | None] = web.AppKey("status_token")

MAX_BODY = 1024 * 1024  # provider reports and unsubscribe forms are small: larger bodies get 413

LOOPBACK_ONLY = (
    "/status answers loopback clients only while PGNOTIFY_STATUS_TOKEN is unset: use kubectl "
    "port-forward or exec, or set PGNOTIFY_STATUS_TOKEN and send 'Authorization: Bearer <token>'"
)


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


def is_loopback(remote: str | None) -> bool:
    """Is the peer address 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z)? Never a header."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


CHALLENGE = 'Bearer realm="pgnotify-worker status"'


def status_refusal(
    token: bytes | None, authorization: str | None, remote: str | None
) -> tuple[int, str, str | None] | None:
    """None when /status may answer; else (401 or 403, why, WWW-Authenticate). With a token set,
    only a matching bearer token opens it (from loopback too); without one, a loopback peer."""
    if token:
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, "send Authorization: Bearer <PGNOTIFY_STATUS_TOKEN>", CHALLENGE
        # bytes: compare_digest refuses str with non-ASCII characters (a header may carry them)
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token):
            return 401, "wrong bearer token", f'{CHALLENGE}, error="invalid_token"'
        return None
    if is_loopback(remote):
        return None
    return 403, LOOPBACK_ONLY, None


async def status(request: web.Request) -> web.Response:
    """Everything an operator asks first, as JSON; no secrets, no recipients."""
    token = request.app[STATUS_TOKEN]
    refused = status_refusal(token, request.headers.get("Authorization"), request.remote)
    if refused is not None:
        code, why, challenge = refused
        headers = {"WWW-Authenticate": challenge} if challenge else {}
        return web.json_response({"error": why}, status=code, headers=headers)
    started = time.perf_counter()
    body = await request.app[STATUS]()
    body["took_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


def make_app(
    status_fn: StatusFn,
    ready_fn: ReadyFn,
    metrics_fn: MetricsFn,
    extra_routes: Sequence[Callable[[web.Application], None]] = (),
    *,
    status_token: str | None = None,
) -> web.Application:
    """The application (tests may serve it on their own runner). An empty token counts as unset."""
    app = web.Application(client_max_size=MAX_BODY)
    app[STATUS_TOKEN] = status_token.encode() if status_token else None
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
