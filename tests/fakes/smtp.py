"""A fake SMTP submission server: aiosmtpd's threaded Controller on 127.0.0.1:<random port>.

The server runs in its own thread and event loop (so both async and blocking clients work);
waiting is done in the test's loop through `call_soon_threadsafe`, never by polling.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Literal, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.fakes.tls import tls_material

TlsMode = Literal["none", "starttls", "implicit"]


@dataclass
class SMTPMessage:
    """One DATA transaction."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    raw: bytes
    message: EmailMessage  # parsed with email.policy.default
    reply: str  # what the server answered to DATA
    tls: bool
    auth_user: str | None
    at: float  # time.monotonic()


class _Controller(Controller):
    """Binds port 0 and learns the real port before `_trigger_server` connects to it."""

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        async def create() -> asyncio.AbstractServer:
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=0, ssl=self.ssl_context
            )
            self.port = server.sockets[0].getsockname()[1]
            return server

        return create()


class FakeSMTP:
    """`messages`: accepted messages; `attempts`: every DATA (also scripted rejections).

    - `username`/`password`: when given, AUTH (PLAIN/LOGIN) is offered and MAIL requires it
      (530 5.7.0 otherwise); wrong credentials get 535 5.7.8.
    - `tls`: "none", "starttls" (STARTTLS offered; required before MAIL/AUTH when
      `require_starttls`) or "implicit" (TLS from the first byte, port-465 style).
    - `reply_next(n, code, text)`: answer the next n DATA with that reply (e.g. 451 or 550).
    - `slow_next(n, seconds)`: delay the next n DATA replies.
    - `rcpt_replies`: address -> reply line for RCPT TO (e.g. "550 5.1.1 User unknown").
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMode = "none",
        require_starttls: bool = True,
        hostname: str = "localhost",
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.username, self.password = username, password
        self.tls: TlsMode = tls
        self.require_starttls = require_starttls
        self.server_hostname = hostname
        self.messages: list[SMTPMessage] = []
        self.attempts: list[SMTPMessage] = []
        self.rcpt_replies: dict[str, str] = {}
        self.auth_attempts: list[tuple[str, bool]] = []  # (login, success)
        self.ca_pem = tls_material().ca_pem
        self._lock = threading.Lock()
        self._replies: deque[list[Any]] = deque()  # [remaining, reply or None, delay]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._controller: _Controller | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        return self.username is not None

    def ssl_context_for_clients(self) -> ssl.SSLContext:
        """A verifying client context that trusts the fake's CA (hostname localhost/127.0.0.1)."""
        return tls_material().client_context()

    async def start(self) -> Self:
        self._loop = asyncio.get_running_loop()
        server_ctx = tls_material().server_context() if self.tls != "none" else None
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "server_hostname": self.server_hostname,
            "ready_timeout": 5.0,
            "data_size_limit": 35 * 1024 * 1024,
        }
        if self.tls == "implicit":
            kwargs["ssl_context"] = server_ctx
        elif self.tls == "starttls":
            kwargs["tls_context"] = server_ctx
            kwargs["require_starttls"] = self.require_starttls
        if self.auth_enabled:
            kwargs["authenticator"] = self._authenticate
            # Over STARTTLS, AUTH is only offered after TLS (like real submission servers).
            kwargs["auth_require_tls"] = self.tls == "starttls"
        controller = _Controller(_Handler(self), **kwargs)
        await asyncio.to_thread(controller.start)
        self._controller = controller
        self.port = controller.port
        return self

    async def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            await asyncio.to_thread(controller.stop)
        for _, future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- scripting ---------------------------------------------------------------------------

    def reply_next(self, n: int, code: int, text: str) -> None:
        """Answer the next `n` DATA commands with `<code> <text>` instead of 250."""
        with self._lock:
            self._replies.append([n, f"{code} {text}", 0.0])

    def slow_next(self, n: int, seconds: float) -> None:
        """Answer the next `n` DATA commands normally, but only after `seconds`."""
        with self._lock:
            self._replies.append([n, None, seconds])

    def _take_reply(self) -> tuple[str | None, float]:
        with self._lock:
            if not self._replies:
                return None, 0.0
            entry = self._replies[0]
            entry[0] -= 1
            if entry[0] <= 0:
                self._replies.popleft()
            return entry[1], entry[2]

    # --- waiting -----------------------------------------------------------------------------

    def _changed(self) -> None:
        """Called in the server thread after any recorded change."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise TimeoutError(f"FakeSMTP: condition not met in {timeout}s") from None
        finally:
            self._waiters.remove(entry)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[SMTPMessage]:
        """Until `count` messages were accepted; returns the first `count`."""
        try:
            await self.wait_until(lambda: len(self.messages) >= count, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"FakeSMTP: {len(self.messages)} of {count} messages in {timeout}s"
            ) from None
        return self.messages[:count]

    async def wait_for_attempts(self, count: int, timeout: float = 10.0) -> list[SMTPMessage]:
        """Until `count` DATA transactions happened (accepted or rejected)."""
        await self.wait_until(lambda: len(self.attempts) >= count, timeout)
        return self.attempts[:count]

    # --- server-side callbacks (server thread) -------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        ok = login == self.username and data.password.decode("utf-8", "replace") == self.password
        with self._lock:
            self.auth_attempts.append((login, ok))
        self._changed()
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


def _is_tls(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class _Handler:
    def __init__(self, fake: FakeSMTP) -> None:
        self.fake = fake

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.fake.auth_enabled and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.fake.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if raw is None:
            content = envelope.content or b""
            raw = content.encode() if isinstance(content, str) else content
        scripted, delay = self.fake._take_reply()
        if delay > 0:
            await asyncio.sleep(delay)
        reply = scripted or "250 2.0.0 Message accepted for delivery"
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        record = SMTPMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            raw=raw,
            message=parsed,
            reply=reply,
            tls=session.ssl is not None or _is_tls(server),
            auth_user=session.auth_data if session.authenticated else None,
            at=time.monotonic(),
        )
        with self.fake._lock:
            self.fake.attempts.append(record)
            if reply.startswith("2"):
                self.fake.messages.append(record)
        self.fake._changed()
        return reply
