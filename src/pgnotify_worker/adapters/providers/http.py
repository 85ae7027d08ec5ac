"""Shared HTTP helper: a session per provider, explicit timeouts, errors mapped to outcomes."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from pgnotify_worker import __version__
from pgnotify_worker.core.classify import classify_http
from pgnotify_worker.models import Outcome, Permanent, Retryable

USER_AGENT = f"pgnotify-worker/{__version__}"
MAX_RESPONSE_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """Status, headers and (at most MAX_RESPONSE_BYTES of) body of a response."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def make_session(
    timeout: float,
    *,
    limit: int = 100,
    resolver: aiohttp.abc.AbstractResolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """A session with a total and a connect timeout, no cookies, no environment lookups per
    request (aiohttp's trust_env reads the proxy variables and ~/.netrc on every request: it
    more than halved a provider client's throughput). Provider APIs pass `env_proxy(url)` as
    the proxy; webhooks and Web Push (customer-chosen URLs behind the SSRF guard) go direct.
    `ssl_context` replaces the system trust store (tests trust their own CA this way)."""
    connector = aiohttp.TCPConnector(
        limit=limit, resolver=resolver, ttl_dns_cache=10, ssl=ssl_context if ssl_context else True
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


_PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy", "no_proxy")


def env_proxy(url: str | URL) -> str | None:
    """The proxy HTTPS_PROXY/HTTP_PROXY/ALL_PROXY name for `url`, unless NO_PROXY covers its host:
    read from the environment as it is now, resolved once per host and setting."""
    target = URL(url)
    setting = tuple(
        os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES
    )
    if not any(setting[:3]):
        return None
    return _proxy_for(target.scheme, target.host or "", setting)


@functools.lru_cache(maxsize=256)
def _proxy_for(scheme: str, host: str, _setting: tuple[str | None, ...]) -> str | None:
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass(host):  # NO_PROXY (on Linux: the environment's)
        return None
    return proxies.get(scheme) or proxies.get("all")


class HttpProvider:
    """What every HTTP provider shares: one session with timeouts that honours the environment's
    HTTPS_PROXY/HTTP_PROXY/NO_PROXY, opened by start(), closed by close(), and the wall clock (for
    Retry-After dates only)."""

    def __init__(
        self, timeout: float, now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    ) -> None:
        self.timeout = timeout
        self.now = now
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session (start() first)."""
        assert self._session is not None, "start() first"
        return self._session

    async def start(self) -> None:
        self._session = make_session(self.timeout)

    async def call(
        self,
        method: str,
        url: str | URL,
        *,
        data: bytes | dict[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer:
        """A request to the provider's API, through the environment's proxy if it names one."""
        return await request(
            self.session, method, url, data=data, headers=headers, proxy=env_proxy(url)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def post(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    data: bytes,
    headers: Mapping[str, str],
    proxy: str | None = None,
) -> HttpAnswer:
    """POST without following redirects; reads at most MAX_RESPONSE_BYTES of the answer.
    `proxy` sends it through that HTTP proxy (the webhook proxy)."""
    async with session.post(
        url, data=data, headers=headers, allow_redirects=False, proxy=proxy
    ) as response:
        body = await response.content.read(MAX_RESPONSE_BYTES)
        return HttpAnswer(response.status, response.headers, body)


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    data: bytes | dict[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    proxy: str | None = None,
) -> HttpAnswer:
    """Any request, no redirects followed; at most MAX_RESPONSE_BYTES of the answer are read."""
    async with session.request(
        method, url, data=data, headers=headers, allow_redirects=False, proxy=proxy
    ) as response:
        body = await response.content.read(MAX_RESPONSE_BYTES)
        return HttpAnswer(response.status, response.headers, body)


def json_body(answer: HttpAnswer) -> dict[str, Any]:
    """The answer as a JSON object, or {} when it is not one (gateways send HTML; a 202 sends
    nothing, and raising a JSONDecodeError for that on every send costs more than the check)."""
    if answer.body.lstrip()[:1] != b"{":
        return {}
    try:
        value = json.loads(answer.body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


def transport_outcome(exc: BaseException, what: str) -> Outcome:
    """A failure before an HTTP answer: timeouts and connection errors are retryable."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return Retryable("timeout", f"{what} did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Retryable("dns", f"{what}: name lookup failed")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Retryable(
            "connect", f"{what}: connection failed ({exc.os_error.strerror or 'refused'})"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return Retryable("disconnected", f"{what}: connection closed before a full answer")
    if isinstance(exc, aiohttp.InvalidURL):
        return Permanent("bad_url", f"{what}: invalid URL")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Retryable("transport", f"{what}: {type(exc).__name__}")
    raise exc


def classify_answer(
    answer: HttpAnswer,
    what: str,
    now: Callable[[], dt.datetime],
    message_id: str | None = None,
) -> Outcome:
    """Map an answer with the shared table."""
    return classify_http(answer.status, answer.headers, now(), what=what, message_id=message_id)
