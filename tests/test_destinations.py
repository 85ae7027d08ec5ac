"""Isolation per destination: one endpoint failing (503) and one slow do not delay a healthy
one; a failing endpoint pauses itself, not the provider; an endpoint failing for
destination_disable_after is disabled (event, gauge) and pgnotify.enable_destination() brings it
back. Unit tests for the pure parts first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.config import Settings
from pgnotify_worker.core.circuit import CircuitBreaker, CircuitState
from pgnotify_worker.delivery.destinations import OPENED, Destination, Destinations
from pgnotify_worker.delivery.failover import ChannelProviders, Failover, ProviderSlot
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from tests.support.db import wait_rows
from tests.support.webhooks import Received, WebhookSink
from tests.support.worker import running

# --- the pure parts -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def message(recipient: str) -> RenderedMessage:
    return RenderedMessage(1, "pgn_x", "webhook", recipient, None, "{}", None, {})


async def test_a_slow_destination_at_its_cap_sends_its_row_back_without_an_attempt() -> None:
    destinations = Destinations({"webhook": 2})
    held = [await destinations.admit("https://slow:443", "webhook") for _ in range(2)]
    assert all(isinstance(d, Destination) for d in held)
    started = asyncio.get_running_loop().time()
    refused = await destinations.admit("https://slow:443", "webhook")  # waited, then gave up
    assert isinstance(refused, Retryable) and refused.code == "destination_busy"
    assert asyncio.get_running_loop().time() - started < 0.5
    held[0].answer_seconds = 10.0  # type: ignore[union-attr]
    started = asyncio.get_running_loop().time()
    refused = await destinations.admit("https://slow:443", "webhook")  # known slow: at once
    assert asyncio.get_running_loop().time() - started < 0.05
    assert isinstance(refused, Retryable) and refused.code == "destination_busy"
    assert not refused.tried and refused.retry_after == 10.0
    other = await destinations.admit("https://fast:443", "webhook")  # another is not affected
    assert isinstance(other, Destination)
    destinations.finish(held[1], Sent(), 10.0)  # type: ignore[arg-type]
    assert isinstance(await destinations.admit("https://slow:443", "webhook"), Destination)


async def test_a_quick_destination_at_its_cap_waits_in_memory_for_its_slot() -> None:
    destinations = Destinations({"webhook": 1})
    first = await destinations.admit("https://quick:443", "webhook")
    assert isinstance(first, Destination)
    first.answer_seconds = 0.002  # known to answer quickly
    waiting = asyncio.create_task(destinations.admit("https://quick:443", "webhook"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    destinations.finish(first, Sent(), 0.002)
    assert isinstance(await waiting, Destination)


async def test_a_destination_circuit_opens_pauses_longer_after_a_failed_probe_and_closes() -> None:
    clock = Clock()
    destinations = Destinations({"webhook": 10}, threshold=2, open_seconds=30, clock=clock)
    key = "https://bad:443"
    events = []
    for _ in range(2):
        dest = await destinations.admit(key, "webhook")
        assert isinstance(dest, Destination)
        events.append(destinations.finish(dest, Retryable("http_503", "503"), 0.01))
    assert events == [None, OPENED]
    paused = await destinations.admit(key, "webhook")
    assert isinstance(paused, Retryable) and paused.code == "destination_paused"
    assert not paused.tried and paused.retry_after == 30
    clock.now += 30
    probe = await destinations.admit(key, "webhook")
    assert isinstance(probe, Destination)
    assert destinations.finish(probe, Retryable("http_503", "503"), 0.01) == OPENED
    assert probe.breaker.open_seconds == 60  # the pause grows per destination
    clock.now += 60
    probe = await destinations.admit(key, "webhook")
    assert isinstance(probe, Destination)
    destinations.failing.add(key)
    assert destinations.finish(probe, Sent(), 0.01) == "recovered"
    assert probe.breaker.state is CircuitState.CLOSED and probe.breaker.open_seconds == 30


async def test_a_disabled_destination_fails_its_rows_with_the_way_back() -> None:
    destinations = Destinations({"webhook": 10})
    destinations.disabled["https://gone:443"] = "failing for 3 days"
    refused = await destinations.admit("https://gone:443", "webhook")
    assert isinstance(refused, Permanent) and refused.code == "destination_disabled"
    assert "pgnotify.enable_destination('https://gone:443')" in refused.message


def test_idle_destinations_are_forgotten_beyond_the_bound_but_paused_ones_kept() -> None:
    destinations = Destinations({"webhook": 10}, max_entries=8)
    paused = destinations.get("https://paused:443")
    paused.breaker.failure(0.0, "x", trip=True)
    for i in range(20):
        destinations.get(f"https://h{i}:443")
    assert len(destinations.entries) <= 8
    assert "https://paused:443" in destinations.entries


class ByHost:
    """A provider sending to many hosts: fails for the host 'bad'."""

    name = "hooks"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def destination(self, recipient: str) -> str | None:
        return f"https://{recipient}:443"

    async def send(self, message: RenderedMessage) -> Outcome:
        if message.recipient == "bad":
            return Retryable("http_503", "503 from bad")
        return Sent("ok")


async def test_failures_of_one_destination_do_not_pause_the_provider() -> None:
    breaker = CircuitBreaker(threshold=3)
    failover = Failover(
        {"webhook": ChannelProviders("webhook", [ProviderSlot(ByHost(), breaker, None)])},
        destinations=Destinations({"webhook": 10}, threshold=3),
    )
    outcomes = [(await failover.send_chain("webhook", message("bad")))[0] for _ in range(10)]
    assert [type(o).__name__ for o in outcomes[:3]] == ["Retryable"] * 3
    assert all(isinstance(o, Retryable) and not o.tried for o in outcomes[3:])  # paused, waiting
    assert breaker.state is CircuitState.CLOSED and breaker.failures == 0
    assert failover.capacity("webhook", 10) == 10
    outcome, provider = await failover.send_chain("webhook", message("good"))
    assert (outcome, provider) == (Sent("ok"), "hooks")


# --- against a worker: three endpoints ------------------------------------------------------------


@contextlib.asynccontextmanager
async def endpoint(
    answer: Callable[[web.Request], asyncio.Future[web.Response] | object],
) -> AsyncIterator[WebhookSink]:
    sink = WebhookSink()
    sink.responder = answer  # type: ignore[assignment]
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield sink
    finally:
        await runner.cleanup()


async def enqueue(conn: asyncpg.Connection, url: str, max_attempts: int = 20) -> int:
    nid: int = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, max_attempts => $2)",
        url,
        max_attempts,
    )
    return nid


async def test_a_failing_and_a_slow_endpoint_do_not_delay_a_healthy_one(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    slow_now = slow_max = 0

    async def slow(_r: Received, _n: int) -> web.Response:
        nonlocal slow_now, slow_max
        slow_now += 1
        slow_max = max(slow_max, slow_now)
        try:
            await asyncio.sleep(3)
        finally:
            slow_now -= 1
        return web.Response(status=200)

    async with (
        endpoint(lambda _r, _n: web.Response(status=503)) as failing,
        endpoint(slow) as slow_sink,
        endpoint(lambda _r, _n: web.Response(status=200)) as healthy,
    ):
        settings = worker_settings(
            channels="webhook",
            channel_concurrency="webhook=8",
            destination_concurrency=2,
            webhook_timeout=5.0,
        )
        async with running(settings) as service:
            healthy_ids = []
            for _ in range(60):  # 4 s of a steady mix, 15 per second to each endpoint
                healthy_ids.append(await enqueue(conn, healthy.url + "/h"))
                await enqueue(conn, failing.url + "/f")
                await enqueue(conn, slow_sink.url + "/s")
                await asyncio.sleep(1 / 15)
            await wait_rows(conn, healthy_ids, {"sent"}, service, timeout=20)
            assert service.worker is not None
            slot = service.worker.dispatcher.failover.channels["webhook"].slots[0]
            assert slot.breaker.state is CircuitState.CLOSED  # the provider never paused
            assert service.destinations is not None
            bad = service.destinations.entries[failing.url]
            assert bad.breaker.state is not CircuitState.CLOSED  # the failing endpoint did
            status = await service.status()
            assert status["destinations"]["paused_count"] >= 1
        waits = await conn.fetch(
            "SELECT extract(epoch FROM sent_at - created_at)::float8 AS s "
            "FROM pgnotify.notifications WHERE id = ANY($1) ORDER BY s",
            healthy_ids,
        )
        seconds = [r["s"] for r in waits]
        p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
        assert p99 < 0.5, seconds[-5:]
        assert slow_max <= 2  # a slow endpoint holds at most its share of the 8 slots
        attempts = await conn.fetchval(
            "SELECT max(attempts) FROM pgnotify.notifications WHERE recipient LIKE $1",
            slow_sink.url + "%",
        )
        assert attempts <= 1  # waiting for its slots spent no attempt


async def test_an_endpoint_failing_long_enough_is_disabled_and_enable_brings_it_back(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    healthy = False

    def answer(_r: Received, _n: int) -> web.Response:
        return web.Response(status=200 if healthy else 503)

    async with endpoint(answer) as sink:
        settings = worker_settings(
            channels="webhook",
            circuit_failure_threshold=2,
            circuit_open_seconds=0.2,
            destination_disable_after=0.5,
        )
        async with running(settings) as service:
            nid = await enqueue(conn, sink.url + "/x", max_attempts=50)
            [row] = await wait_rows(conn, [nid], {"failed"}, service, timeout=20)
            assert "is disabled" in row["last_error"]
            assert "pgnotify.enable_destination" in row["last_error"]
            events = await conn.fetch(
                "SELECT event, error_code, detail FROM pgnotify.events "
                "WHERE notification_id = $1 ORDER BY id",
                nid,
            )
            kinds = [(e["event"], e["error_code"]) for e in events]
            assert ("destination_disabled", "destination_disabled") in kinds
            assert kinds[-1] == ("failed", "destination_disabled")
            origin = await conn.fetchval(
                "SELECT origin FROM pgnotify.destinations WHERE disabled_at IS NOT NULL"
            )
            assert origin == sink.url  # http://127.0.0.1:port
            await asyncio.sleep(0.5)  # a refresh of the gauges
            assert b"pgnotify_destinations_disabled 1.0" in service.metrics.render()
            # re-enable by SQL (any URL on the origin), then replay the row
            healthy = True
            assert await conn.fetchval("SELECT pgnotify.enable_destination($1)", sink.url + "/x")
            assert not await conn.fetchval("SELECT pgnotify.enable_destination($1)", sink.url)
            await asyncio.sleep(0.5)
            assert b"pgnotify_destinations_disabled 0.0" in service.metrics.render()
            await conn.execute("SELECT pgnotify.retry($1)", nid)
            [row] = await wait_rows(conn, [nid], {"sent"}, service, timeout=10)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.destinations") == 0


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Hooks.Acme.com/a/b?c=1", "https://hooks.acme.com:443"),
        ("http://hooks.acme.com", "http://hooks.acme.com:80"),
        ("https://hooks.acme.com:8443/x", "https://hooks.acme.com:8443"),
        ("http://user:pw@127.0.0.1:9000/x", "http://127.0.0.1:9000"),
        ("https://[::1]:8443/x", "https://[::1]:8443"),
    ],
)
async def test_the_sql_origin_matches_the_worker(
    conn: asyncpg.Connection, url: str, origin: str
) -> None:
    from yarl import URL

    from pgnotify_worker.adapters.providers.webhook import origin as worker_origin

    assert await conn.fetchval("SELECT pgnotify.destination_origin($1)", url) == origin
    if "@" not in url:
        assert worker_origin(URL(url)) == origin
