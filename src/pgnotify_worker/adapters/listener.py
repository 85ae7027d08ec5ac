"""The LISTEN connection: held for good, reconnected with back-off, proven by NOTIFY round trips."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.db import DB_ERRORS
from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.errors import ListenerUnhealthy
from pgnotify_worker.models import ListenerState, Ping, Wake, parse_wake

log = logging.getLogger(__name__)
CHANNEL = "pgnotify"


class Listener:
    """LISTEN pgnotify on a dedicated connection; hands wake-ups to `on_wake`."""

    def __init__(
        self,
        dsn: str,
        worker_id: str,
        on_wake: Callable[[Wake], None],
        on_connect: Callable[[], None],
        *,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        on_state_change: Callable[[ListenerState], None] | None = None,
        ping_via: Callable[[str, str], Awaitable[object]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.on_wake = on_wake
        self.on_connect = on_connect
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.on_state_change = on_state_change or (lambda _state: None)
        # The ping goes out on another connection (the pool), as a producer's NOTIFY would: a
        # LISTEN that only hears its own connection (a transaction pooler in between) fails it.
        self.ping_via = ping_via
        digest = hashlib.sha1(worker_id.encode(), usedforsecurity=False).hexdigest()[:16]
        self.ping_channel = f"pgnotify_ping_{digest}"
        self.state = ListenerState()
        self._pongs: dict[str, asyncio.Future[None]] = {}

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        payload = str(payload)
        if channel == self.ping_channel:
            waiter = self._pongs.pop(payload, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        wake = parse_wake(payload)
        if not isinstance(wake, Ping):
            self.on_wake(wake)

    async def run(self) -> None:
        """Listen until cancelled; every (re)connect triggers `on_connect` (a full sweep)."""
        backoff = Backoff(0.1, 5.0)
        while True:
            conn: asyncpg.Connection | None = None
            lost: asyncio.Event = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=self.connect_timeout,
                    statement_cache_size=0,
                    server_settings={"application_name": "pgnotify-worker listener"},
                )
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(self.ping_channel, self._on_notify)
                await self._ping(conn)  # prove it before calling ourselves ready
                self.state.connected = True
                self.state.last_error = None
                self.state.backend_pid = conn.get_server_pid()
                self.on_state_change(self.state)
                log.info("listener connected", extra={"action": "listener_connected"})
                self.on_connect()
                backoff.reset()
                await self._watch(conn, lost)
            except Exception as exc:  # whatever broke, the listener comes back
                was_connected = self.state.connected
                self.state.connected = False
                self.state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self.state.backend_pid = None
                if was_connected:
                    self.state.reconnects += 1
                self.on_state_change(self.state)
                expected = isinstance(exc, (*DB_ERRORS, ListenerUnhealthy))
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "listener lost (%s); reconnecting in about %.1fs",
                    self.state.last_error,
                    backoff.peek(),
                    exc_info=not expected,
                    extra={"action": "listener_lost"},
                )
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff.next())

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Ping every interval; return (by raising) when the connection is gone or deaf."""
        while True:
            try:
                await asyncio.wait_for(lost.wait(), timeout=self.ping_interval)
            except TimeoutError:
                await self._ping(conn)
                continue
            raise ListenerUnhealthy("connection closed by the server")

    async def _ping(self, conn: asyncpg.Connection) -> None:
        token = uuid.uuid4().hex
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = waiter
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.ping_timeout):
                if self.ping_via is not None:
                    await self.ping_via(self.ping_channel, token)
                else:
                    await conn.execute(queries.PING, self.ping_channel, token)
                await waiter
        except TimeoutError:
            hint = (
                " (a LISTEN through a transaction pooler hears nothing: point "
                "PGNOTIFY_LISTEN_DATABASE_URL at the database directly or a session-mode pool)"
                if self.ping_via is not None
                else ""
            )
            raise ListenerUnhealthy(
                f"NOTIFY round trip took longer than {self.ping_timeout:g}s{hint}"
            ) from None
        finally:
            self._pongs.pop(token, None)
        self.state.last_ping_ms = (asyncio.get_running_loop().time() - started) * 1000
