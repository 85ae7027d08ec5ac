"""Who may read /status: a bearer token when PGNOTIFY_STATUS_TOKEN is set, loopback peers only when
it is not. /healthz, /readyz and /metrics stay open either way (probes and Prometheus)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pgnotify_worker.adapters import http_server
from pgnotify_worker.adapters.http_server import is_loopback, status_refusal
from pgnotify_worker.config import Settings
from tests.support.worker import running

TOKEN = "status-token-0123456789abcdef"


async def _status() -> dict[str, Any]:
    return {"worker_id": "w-1"}


async def _ready() -> list[str]:
    return []


def _metrics() -> bytes:
    return b"# HELP pgnotify_ready 1 when ready.\n"


async def _serve(host: str, token: str | None) -> tuple[web.AppRunner, str]:
    app = http_server.make_app(_status, _ready, _metrics, status_token=token)
    runner, port = await http_server.start(app, host, 0)
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: only picks the outgoing interface
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if is_loopback(address) else address


# --- the decision, pure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.10.0.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 loopback peer on a dual-stack socket
        ("10.0.0.7", False),
        ("192.0.2.2", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_loopback_is_decided_by_the_peer_address(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback
    refusal = status_refusal(None, None, remote)
    assert refusal is None if loopback else refusal == (403, http_server.LOOPBACK_ONLY, None)


@pytest.mark.parametrize("remote", ["127.0.0.1", "10.0.0.7"])
def test_with_a_token_only_the_token_opens_it_from_anywhere(remote: str) -> None:
    token = TOKEN.encode()
    assert status_refusal(token, f"Bearer {TOKEN}", remote) is None
    assert status_refusal(token, f"bearer  {TOKEN} ", remote) is None  # scheme is case-insensitive
    for wrong in (
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        "Bearer nope",
        f"Bearer {TOKEN}x",
        "Bearer é",
    ):
        refusal = status_refusal(token, wrong, remote)
        assert refusal is not None and refusal[0] == 401, wrong


# --- over HTTP -----------------------------------------------------------------------------------


async def test_without_a_token_loopback_reads_status_and_probes_are_unchanged(
    http: aiohttp.ClientSession,
) -> None:
    runner, base = await _serve("127.0.0.1", None)
    try:
        status = await http.get(base + "/status")
        assert status.status == 200 and (await status.json())["worker_id"] == "w-1"
        await _assert_probes_open(http, base)
    finally:
        await runner.cleanup()


async def test_with_a_token_status_needs_it_and_probes_do_not(http: aiohttp.ClientSession) -> None:
    runner, base = await _serve("127.0.0.1", TOKEN)
    try:
        missing = await http.get(base + "/status")
        assert missing.status == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer ")
        assert "invalid_token" not in missing.headers["WWW-Authenticate"]
        wrong = await http.get(base + "/status", headers={"Authorization": "Bearer wrong"})
        assert wrong.status == 401
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        assert TOKEN not in await wrong.text()
        right = await http.get(base + "/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status == 200 and (await right.json())["worker_id"] == "w-1"
        await _assert_probes_open(http, base)
    finally:
        await runner.cleanup()


async def _assert_probes_open(http: aiohttp.ClientSession, base: str) -> None:
    healthz = await http.get(base + "/healthz")
    assert (healthz.status, await healthz.json()) == (200, {"status": "ok"})
    readyz = await http.get(base + "/readyz")
    assert (readyz.status, await readyz.json()) == (200, {"status": "ready"})
    metrics = await http.get(base + "/metrics")
    assert metrics.status == 200 and "pgnotify_ready" in await metrics.text()
    assert metrics.headers["Content-Type"].startswith("text/plain")


async def test_a_peer_on_a_non_loopback_address_is_refused_without_a_token(
    http: aiohttp.ClientSession,
) -> None:
    """A real connection whose peer address is this machine's non-loopback interface address:
    what a client elsewhere on the network looks like to the worker (the packets stay on this
    host, but the server sees the non-loopback source address, which is all it decides on)."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    runner, base = await _serve(address, None)
    try:
        refused = await http.get(base + "/status", headers={"X-Forwarded-For": "127.0.0.1"})
        assert refused.status == 403
        assert "PGNOTIFY_STATUS_TOKEN" in (await refused.json())["error"]
        await _assert_probes_open(http, base)
    finally:
        await runner.cleanup()
    runner, base = await _serve(address, TOKEN)
    try:
        allowed = await http.get(base + "/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status == 200
    finally:
        await runner.cleanup()


async def test_the_running_worker_wires_the_token_setting(
    worker_settings: Callable[..., Settings], http: aiohttp.ClientSession
) -> None:
    async with running(worker_settings(status_token=TOKEN)) as service:
        base = f"http://127.0.0.1:{service.http_port}"
        assert (await http.get(base + "/status")).status == 401
        right = await http.get(base + "/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status == 200 and "worker_id" in await right.json()
        assert (await http.get(base + "/readyz")).status == 200
        assert (await http.get(base + "/metrics")).status == 200


def test_the_token_is_a_secret_scrubbed_from_logs(worker_settings: Callable[..., Settings]) -> None:
    settings = worker_settings(status_token=TOKEN)
    assert TOKEN in settings.secret_values()
    assert TOKEN not in repr(settings)
