"""Email over SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, a few connections kept open."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr

from pgnotify_worker.adapters.providers.email_common import (
    format_sender,
    missing_content,
    parse_sender,
    unsubscribe_headers,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider

if TYPE_CHECKING:  # imported where a message is sent: a worker without SMTP does not load it
    import aiosmtplib

Security = Literal["starttls", "tls", "none"]


class SmtpProvider:
    """A small pool of SMTP connections; each message is one transaction on one of them.

    A 4xx reply is retried, a 5xx reply fails the notification (a 5.1.x "no such mailbox" also
    suppresses the address), 530/535 (credentials) pause the provider via its circuit."""

    name = "smtp"

    def __init__(
        self,
        host: str | None,
        sender: str | None,
        *,
        port: int = 587,
        security: Security = "starttls",
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        timeout: float = 15.0,
        connections: int = 4,
    ) -> None:
        if not host:
            raise ProviderConfigError("smtp: PGNOTIFY_SMTP_HOST is not set")
        name, address = parse_sender(sender, "smtp")
        self.sender = format_sender(name, address)
        self.envelope_from = address
        self.domain = address.rpartition("@")[2]
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self.password = password
        self.timeout = timeout
        self.tls_context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(connections)

    async def start(self) -> None:
        return None  # connections open on first use

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            await _quit(client)

    def build(self, message: RenderedMessage) -> EmailMessage:
        """A multipart/alternative email with a Message-ID stable across retries."""
        email = EmailMessage()
        email["From"] = self.sender
        email["To"] = message.recipient
        email["Subject"] = message.subject or ""
        email["Date"] = format_datetime(message.created_at or dt.datetime.now(dt.UTC))
        email["Message-ID"] = f"<{message.idempotency_key}@{self.domain}>"
        for header, value in unsubscribe_headers(message).items():
            email[header] = value
        if message.text:
            email.set_content(message.text)
            if message.html:
                email.add_alternative(message.html, subtype="html")
        else:
            email.set_content(message.html or "", subtype="html")
        return email

    async def _connect(self) -> aiosmtplib.SMTP:
        import aiosmtplib  # noqa: PLC0415 - see the import above

        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.security == "tls",
            start_tls=self.security == "starttls",
            tls_context=self.tls_context if self.security != "none" else None,
            username=self.username,
            password=self.password,
        )
        await client.connect()
        return client

    async def send(self, message: RenderedMessage) -> Outcome:
        import aiosmtplib  # noqa: PLC0415 - see the import above

        problem = missing_content(message)
        if problem:
            return problem
        try:
            email = self.build(message)
        except ValueError as exc:  # a header the email package refuses (line breaks, ...)
            return Permanent("bad_header", f"smtp: {exc}")
        async with self._slots:
            reused = not self._idle.empty()
            client = self._idle.get_nowait() if reused else None
            try:
                if client is None:
                    client = await self._connect()
                try:
                    await client.send_message(
                        email, sender=self.envelope_from, recipients=[message.recipient]
                    )
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # the server closed an idle connection: nothing was accepted, try once anew
                    await _quit(client)
                    client = await self._connect()
                    await client.send_message(
                        email, sender=self.envelope_from, recipients=[message.recipient]
                    )
            except aiosmtplib.SMTPRecipientsRefused as exc:
                if client is not None:
                    self._idle.put_nowait(client)  # the connection itself is fine
                refused = exc.recipients[0] if exc.recipients else None
                code = refused.code if refused is not None else 550
                return classify_smtp(code, refused.message if refused is not None else "refused")
            except aiosmtplib.SMTPResponseException as exc:
                await _quit(client)
                return classify_smtp(exc.code, exc.message)
            except (aiosmtplib.SMTPTimeoutError, TimeoutError):
                await _quit(client)
                return Retryable("timeout", f"smtp {self.host} did not answer in time")
            except (aiosmtplib.SMTPException, OSError) as exc:
                await _quit(client)
                return Retryable("smtp_connection", f"smtp {self.host}: {type(exc).__name__}")
            self._idle.put_nowait(client)
        return Sent(email["Message-ID"])


async def _quit(client: aiosmtplib.SMTP | None) -> None:
    if client is None:
        return
    import aiosmtplib  # noqa: PLC0415 - see the import above

    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


# --- how its answers are classified ---------------------------------------------------------


def classify_smtp(code: int, message: str) -> Outcome:
    """SMTP reply codes: 4xx transient, 5xx permanent (530/535 bad credentials: pause)."""
    text = f"smtp {code}: {message}"[:300]
    if code in (530, 534, 535, 538):
        return Retryable(f"smtp_{code}", text, None, trip=True)
    if 400 <= code < 500:
        return Retryable(f"smtp_{code}", text, None, throttled=code in (421, 450, 451, 452))
    if re.search(r"\b5\.1\.(?:0|1|10)\b", message):  # enhanced status: no such mailbox
        return Permanent(f"smtp_{code}", text, suppress="hard_bounce")
    return Permanent(f"smtp_{code}", text)


# --- settings and construction (read by the registry and the settings table) -------------------


class SmtpSettings(ProviderSettings):
    """smtp settings (PGNOTIFY_SMTP_*)."""

    smtp_host: str | None = Field(None, description="SMTP server host.")
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP server port.")
    smtp_security: Literal["starttls", "tls", "none"] = Field(
        "starttls", description="starttls (587), tls (implicit, 465) or none (local relays only)."
    )
    smtp_username: str | None = Field(None, description="SMTP user name (none: no AUTH).")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_ca_file: Path | None = Field(
        None, description="CA bundle to trust for the SMTP server's certificate (default: system)."
    )
    smtp_connections: int = Field(4, ge=1, le=100, description="SMTP connections kept open.")

    def basic_auth_pairs(self) -> list[tuple[str, str]]:
        """The AUTH PLAIN/LOGIN credentials (scrubbed in every encoding)."""
        password = reveal(self.smtp_password)
        return [(self.smtp_username, password)] if self.smtp_username and password else []


def _build(cfg: SmtpSettings, ctx: Context) -> Provider:
    return SmtpProvider(
        cfg.smtp_host,
        ctx.settings.email_from,
        port=cfg.smtp_port,
        security=cfg.smtp_security,
        username=cfg.smtp_username,
        password=reveal(cfg.smtp_password),
        ca_file=cfg.smtp_ca_file,
        timeout=ctx.settings.provider_timeout,
        connections=cfg.smtp_connections,
    )


SPECS = (ProviderSpec("smtp", frozenset({"email"}), SmtpSettings, _build, default_rate="10/10"),)
