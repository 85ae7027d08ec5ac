"""Webhooks signed per Standard Webhooks, with an SSRF guard that pins the checked address."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import Field, SecretStr
from yarl import URL

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.core import netguard, signing
from pgnotify_worker.errors import ProviderConfigError, TargetBlocked
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage
from pgnotify_worker.ports import Provider
from pgnotify_worker.tracing import inject

_COMPACT = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False
)  # built once: dumps(**kw) is not


class GuardedResolver(AbstractResolver):
    """Resolves once and returns only allowed addresses, so aiohttp connects to a checked IP."""

    def __init__(self, allowed: Sequence[netguard.IPNetwork]) -> None:
        self.allowed = tuple(allowed)
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept, reasons = [], []
        for result in results:
            reason = netguard.blocked_reason(result["host"], self.allowed)
            if reason is None:
                kept.append(result)
            else:
                reasons.append(f"{result['host']} ({reason})")
        if not kept:
            raise TargetBlocked(f"{host} resolves only to refused addresses: {', '.join(reasons)}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def literal_refusal(url: URL, allowed: Sequence[netguard.IPNetwork], what: str) -> Permanent | None:
    """Why an IP-literal host is refused. aiohttp does not ask the resolver about IP literals,
    so they are checked here; names are checked by GuardedResolver when they resolve."""
    host = url.host or ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    reason = netguard.blocked_reason(address, allowed)
    if reason is None:
        return None
    return Permanent(
        "target_refused",
        f"{what} {address} is {reason}; allow it with PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS",
    )


def guarded_session(
    timeout: float,
    allowed: Sequence[netguard.IPNetwork],
    proxy: str | None,
    limit: int = 100,
    ssl_context: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """The session of customer-chosen URLs (webhooks, Web Push): never the environment's proxies.
    Direct, every name resolved through GuardedResolver; or, with PGNOTIFY_WEBHOOK_PROXY, through
    that proxy only: the connection goes to the proxy (which may well be on a private address), so
    the guard cannot see what the target resolves to and the proxy must enforce egress rules.
    IP-literal targets are refused before either (literal_refusal)."""
    resolver = None if proxy else GuardedResolver(allowed)
    return http.make_session(timeout, limit=limit, resolver=resolver, ssl_context=ssl_context)


def origin(url: URL) -> str:
    """scheme://host:port of a URL, the port always written (a destination's key)."""
    host = url.host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{url.port}"


def envelope(message: RenderedMessage) -> bytes:
    """The default body: {type, timestamp, data} as Standard Webhooks suggests."""
    created = message.created_at or dt.datetime.now(dt.UTC)
    body = {
        "type": message.category or message.template or "notification",
        "timestamp": created.isoformat(),
        "data": message.data,
    }
    return _COMPACT.encode(body).encode()


TEXT_PLAIN = "text/plain; charset=utf-8"


def _is_json_document(body: bytes) -> bool:
    """A JSON object or array. Plain text is told apart by its first byte, without paying for a
    JSONDecodeError (its message counts lines through the whole body) on every send."""
    if body.lstrip()[:1] not in (b"{", b"["):
        return False
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class WebhookProvider:
    """POSTs to the recipient URL; 2xx sent, 408/429/5xx/timeouts retry, other 4xx permanent."""

    name = "webhook"

    def __init__(
        self,
        secrets: str | None,
        *,
        timeout: float = 10.0,
        allowed_networks: Sequence[str] = (),
        concurrency: int = 100,
        proxy: str | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not secrets:
            raise ProviderConfigError(
                "PGNOTIFY_WEBHOOK_SECRET is not set: webhooks stay queued until a signing secret "
                "(whsec_<base64>) is configured"
            )
        self.keys = [signing.decode_secret(s) for s in secrets.split(",") if s.strip()]
        self.signer = signing.Signer(self.keys)
        self.allowed = netguard.parse_networks(allowed_networks)
        self.timeout = timeout
        self.concurrency = concurrency
        self.proxy = proxy or None
        self.now = now
        self._session: aiohttp.ClientSession | None = None
        # Parsing and checking a URL costs more than signing it: remember the verdict per URL.
        self._target = functools.lru_cache(maxsize=4096)(self._check_target)
        self._origin = functools.lru_cache(maxsize=4096)(self._origin_of)

    def destination(self, recipient: str) -> str | None:
        """The endpoint's origin: breakers, concurrency and disabling are per destination, so
        one customer's failing or slow endpoint does not hold back the others."""
        return self._origin(recipient)

    def _origin_of(self, recipient: str) -> str | None:
        url = self._target(recipient)
        return None if isinstance(url, Permanent) else origin(url)

    async def start(self) -> None:
        self._session = guarded_session(self.timeout, self.allowed, self.proxy, self.concurrency)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build(self, message: RenderedMessage, timestamp: int) -> tuple[bytes, dict[str, str]]:
        """Body and headers of one attempt (same webhook-id on every attempt)."""
        if message.text is not None:
            body = message.text.encode()
            content_type = "application/json" if _is_json_document(body) else TEXT_PLAIN
        else:
            body = envelope(message)
            content_type = "application/json"
        headers = {
            "Content-Type": content_type,
            "webhook-id": message.idempotency_key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signer.sign(message.idempotency_key, timestamp, body),
        }
        inject(headers)  # traceparent of the send span, when tracing
        return body, headers

    def _check_target(self, recipient: str) -> URL | Permanent:
        """The URL to post to, or why it is refused (names are checked again when resolved)."""
        try:
            url = URL(recipient)
        except ValueError:
            return Permanent("bad_url", "webhook recipient is not a URL")
        if url.scheme not in ("http", "https") or not url.host:
            return Permanent("bad_url", "webhook recipient must be an http(s) URL with a host")
        if url.user or url.password:
            return Permanent("bad_url", "webhook URL must not carry credentials")
        refusal = literal_refusal(url, self.allowed, "webhook target")
        return refusal if refusal is not None else url

    async def send(self, message: RenderedMessage) -> Outcome:
        assert self._session is not None, "start() first"
        url = self._target(message.recipient)
        if isinstance(url, Permanent):
            return url
        body, headers = self.build(message, int(time.time()))
        what = f"webhook {url.host}"
        try:
            answer = await http.post(
                self._session, url, data=body, headers=headers, proxy=self.proxy
            )
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, TargetBlocked):
                return Permanent(
                    "target_refused",
                    f"{exc.os_error.strerror or exc.os_error}; allow it with "
                    "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS",
                )
            return http.transport_outcome(exc, what)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return http.transport_outcome(exc, what)
        return http.classify_answer(answer, what, self.now)


# --- settings and construction (read by the registry and the settings table) -------------------


class WebhookSettings(ProviderSettings):
    """webhook settings (PGNOTIFY_WEBHOOK_*)."""

    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret (whsec_<base64>); several comma-separated "
        "during rotation (each request carries every signature).",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds a webhook request may take.")


def _build(cfg: WebhookSettings, ctx: Context) -> Provider:
    return WebhookProvider(
        reveal(cfg.webhook_secret),
        timeout=cfg.webhook_timeout,
        allowed_networks=ctx.settings.webhook_allowed_networks,
        concurrency=ctx.settings.concurrency_for("webhook"),
        proxy=reveal(ctx.settings.webhook_proxy),
    )


SPECS = (ProviderSpec("webhook", frozenset({"webhook"}), WebhookSettings, _build),)
