"""The common machinery of the fake provider servers: a real aiohttp server on 127.0.0.1 that
records every request and can be scripted to fail, answer slowly or never answer.

Each provider subclass registers its routes in `_routes()` and calls `self._scripted(...)` at the
top of a "send" handler. Scripts apply in FIFO order to requests of one channel (by default
"send"; FakeFCM also has a "token" channel), each to the next `n` requests that arrive there.
Scripted answers come before any validation, like an outage in front of the real API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

from aiohttp import web

from tests.fakes.tls import tls_material

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = bytes | str | Mapping[str, Any] | list[Any] | None


@dataclass
class Recorded:
    """One request a fake received. Header names are lower-cased; `json`/`form` are the parsed
    body when it parses as such (JSON for any body, form only for form-encoded bodies)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    json: Any | None
    form: dict[str, str] | None
    query: dict[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class Script:
    """What to do with the next `remaining` requests of a channel."""

    kind: str  # "respond" (a canned answer), "echo", "delay" (then normal handling) or "hang"
    remaining: int
    status: int = 500
    body: Body = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    shape: Callable[[str], Body] | None = None  # "echo": the answer's body around the echo


def echo_text(method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> str:
    """The request as a careless provider repeats it in an error: credentials first (so they
    survive a provider client's length cap), then the body as sent, then the rest."""
    auth = [f"{k}: {v}" for k, v in headers.items() if k.lower() == "authorization"]
    others = [f"{k}: {v}" for k, v in headers.items() if k.lower() != "authorization"]
    return " | ".join([*auth, body.decode("utf-8", "replace"), f"{method} {path_qs}", *others])


async def record_request(request: web.Request) -> Recorded:
    body = await request.read()
    headers = {k.lower(): v for k, v in request.headers.items()}
    parsed_json: Any | None = None
    if body:
        try:
            parsed_json = jsonlib.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed_json = None
    form: dict[str, str] | None = None
    if request.content_type == "application/x-www-form-urlencoded":
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            form = None
    return Recorded(
        method=request.method,
        path=request.path,
        headers=headers,
        body=body,
        at=time.monotonic(),
        json=parsed_json,
        form=form,
        query=dict(request.query),
    )


def encode_body(body: Body) -> tuple[bytes, str | None]:
    """Bytes and a default content type for a scripted body."""
    if body is None:
        return b"", None
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return jsonlib.dumps(body).encode(), "application/json; charset=utf-8"


def make_response(
    status: int, body: Body = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    data, content_type = encode_body(body)
    out = dict(headers or {})
    if content_type and not any(k.lower() == "content-type" for k in out):
        out["Content-Type"] = content_type
    return web.Response(status=status, body=data, headers=out)


class FakeServer:
    """A real HTTP server on 127.0.0.1:<random port>. Use as `async with Fake(...) as fake:`.

    `requests` holds every request to the provider's main ("send") routes and to unknown
    paths, in arrival order; scripted and rejected requests included.
    """

    #: the `requests` channel name scripted failures apply to by default
    send_channel = "send"

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.url = ""
        self.requests: list[Recorded] = []
        self._scripts: dict[str, deque[Script]] = {}
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "not found"}, status=404)

    async def start(self) -> Self:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._routes(app)
        app.router.add_route("*", "/{tail:.*}", self._fallback)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        ssl_context = tls_material().server_context() if self.tls else None
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self._runner = runner
        return self

    def ssl_context_for_clients(self) -> ssl.SSLContext:
        """A client context trusting the fake's CA (only meaningful with `tls=True`)."""
        return tls_material().client_context()

    async def stop(self) -> None:
        """Release hung and slowed requests (their connections are closed), then shut down."""
        self._stopping.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- waiting -----------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate()` holds; it is re-checked whenever the fake's state changes."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise TimeoutError(f"{type(self).__name__}: condition not met in {timeout}s") from None

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Until at least `count` requests arrived in `requests`; returns the first `count`."""
        try:
            await self.wait_until(lambda: len(self.requests) >= count, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{type(self).__name__}: {len(self.requests)} of {count} requests in {timeout}s"
            ) from None
        return self.requests[:count]

    # --- scripting ---------------------------------------------------------------------------

    def _push(self, script: Script, channel: str | None = None) -> None:
        if script.remaining <= 0:
            return
        self._scripts.setdefault(channel or self.send_channel, deque()).append(script)

    def error_body(self, status: int) -> tuple[Body, dict[str, str]]:
        """The provider's realistic error body (and extra headers) for a bare status."""
        return {"error": f"HTTP {status}"}, {}

    def fail_next(
        self,
        n: int,
        *,
        status: int,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `n` send requests with `status` (after `delay` seconds). Without a
        body the provider's realistic error body for that status is used."""
        extra: dict[str, str] = {}
        if body is None:
            body, extra = self.error_body(status)
        extra.update(headers or {})
        self._push(Script("respond", n, status=status, body=body, headers=extra, delay=delay))

    def echo_next(
        self,
        n: int,
        *,
        status: int,
        shape: Callable[[str], Body] | None = None,
        headers: Mapping[str, str] | None = None,
        channel: str | None = None,
    ) -> None:
        """Answer the next `n` requests of `channel` (default: sends) with `status` and a body
        that repeats the request (Authorization header, body, path, other headers), as many
        real providers do in their error messages. `shape(echo)` builds the body (default:
        {"error": echo, "message": echo})."""
        self._push(
            Script("echo", n, status=status, headers=dict(headers or {}), shape=shape), channel
        )

    def slow_next(self, n: int, seconds: float) -> None:
        """Handle the next `n` send requests normally, but only after `seconds`."""
        self._push(Script("delay", n, delay=seconds))

    def hang_next(self, n: int) -> None:
        """Never answer the next `n` send requests (their connections close at `stop()`)."""
        self._push(Script("hang", n))

    def clear_scripts(self) -> None:
        self._scripts.clear()

    def _take_script(self, channel: str) -> Script | None:
        queue = self._scripts.get(channel)
        if not queue:
            return None
        script = queue[0]
        script.remaining -= 1
        if script.remaining <= 0:
            queue.popleft()
        return script

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` (or forever when negative); False when the server stopped first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if seconds < 0 else seconds):
                await self._stopping.wait()
        return not self._stopping.is_set()

    async def _scripted(self, request: web.Request, channel: str) -> web.StreamResponse | None:
        """The scripted answer for this request, or None to handle it normally."""
        script = self._take_script(channel)
        if script is None:
            return None
        if script.kind == "hang":
            await self._pause(-1)
            return self._drop(request)
        if script.delay > 0 and not await self._pause(script.delay):
            return self._drop(request)
        if script.kind == "respond":
            return make_response(script.status, script.body, script.headers)
        if script.kind == "echo":
            echo = echo_text(
                request.method, request.path_qs, dict(request.headers), await request.read()
            )
            body = script.shape(echo) if script.shape else {"error": echo, "message": echo}
            return make_response(script.status, body, script.headers)
        return None

    def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without an answer (server going away)."""
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=503)

    # --- dispatch ----------------------------------------------------------------------------

    async def _record(self, request: web.Request, into: list[Recorded] | None = None) -> Recorded:
        rec = await record_request(request)
        (self.requests if into is None else into).append(rec)
        await self._notify()
        return rec

    async def _fallback(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return await self._unknown_route(request)

    def _route(
        self,
        handler: Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]],
        *,
        channel: str | None = None,
        into: Callable[[], list[Recorded]] | None = None,
    ) -> Handler:
        """Wrap a handler: record the request, apply scripts, then handle it normally."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            rec = await self._record(request, into() if into is not None else None)
            return await self._process(request, rec, handler, channel or self.send_channel)

        return wrapped

    async def _process(
        self,
        request: web.Request,
        rec: Recorded,
        handler: Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]],
        channel: str,
    ) -> web.StreamResponse:
        """Scripts first, then the real handling; subclasses may wrap this."""
        scripted = await self._scripted(request, channel)
        if scripted is not None:
            return scripted
        response = await handler(request, rec)
        await self._notify()
        return response


def bearer_token(rec: Recorded) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme is case-insensitive)."""
    value = rec.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
