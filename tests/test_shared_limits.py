"""A provider's rate limit is its account's: it holds for all replicas together (kept in
PostgreSQL), a 429 pauses the provider for every replica, and waiting — for a token, a 429 or an
open circuit — spends no attempt. Rates are measured at the fake from its requests' arrival."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from pgnotify_worker.config import Settings
from pgnotify_worker.core.circuit import CircuitBreaker
from pgnotify_worker.delivery.failover import ChannelProviders, Failover, ProviderSlot
from pgnotify_worker.delivery.limits import SharedLimits
from pgnotify_worker.models import RenderedMessage, Retryable, Sent, TokenGrant
from pgnotify_worker.service import Service
from tests.support.db import wait_rows
from tests.support.procs import WorkerProcess
from tests.support.webhooks import WEBHOOK_SECRET, Received, WebhookSink
from tests.support.worker import running

RATE = 20.0
LIMIT = "webhook=20/1"
DONE = {"sent", "failed", "dead"}


async def fill(conn: asyncpg.Connection, url: str, count: int, max_attempts: int = 5) -> list[int]:
    """`count` webhooks in one statement (one NOTIFY wakes every replica)."""
    rows = await conn.fetch(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload, max_attempts) "
        "SELECT 'webhook', $1, jsonb_build_object('seq', g), $3 FROM generate_series(1, $2) g "
        "RETURNING id",
        url,
        count,
        max_attempts,
    )
    return [r["id"] for r in rows]


def steady_rate(arrivals: list[float], skip: float = 0.1) -> float:
    """Requests per second between the arrivals after the first and before the last `skip`
    share of the run (start-up and the tail left out)."""
    arrivals = sorted(arrivals)
    first, last = int(len(arrivals) * skip), int(len(arrivals) * (1 - skip))
    return (last - first) / (arrivals[last] - arrivals[first])


@contextlib.asynccontextmanager
async def in_process_replicas(
    worker_settings: Callable[..., Settings], count: int = 3, **overrides: Any
) -> AsyncIterator[list[Service]]:
    """`count` services in this process: each its own pool, worker and limits; only the
    database is shared, as between pods."""
    async with contextlib.AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(
                running(
                    worker_settings(
                        worker_id=f"replica-{i}", rate_limits=LIMIT, jobs=False, **overrides
                    )
                )
            )
            for i in range(count)
        ]
        yield services


# --- the database side: pgnotify.take_tokens / pause_provider ------------------------------------


async def test_tokens_are_granted_up_to_the_burst_then_at_the_rate(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.provider_limits (provider, rate, burst, tokens) VALUES ('p', 10, 3, 3)"
    )
    take = "SELECT * FROM pgnotify.take_tokens('p', $1, $2)"
    first = await conn.fetchrow(take, 5, False)
    assert first["granted"] == 3 and first["paused_for"] == 0
    # the next token within 1/rate (less when the insert was a few ms earlier: it refilled since)
    assert 0 < first["next_in"] <= 0.1 + 1e-6
    empty = await conn.fetchrow(take, 5, False)
    assert empty["granted"] == 0
    reserved = await conn.fetchrow(take, 2, True)  # ahead of time: the balance goes negative
    assert reserved["granted"] == 2
    assert 0.1 < reserved["ready_in"] <= 0.2 + 1e-6  # two tokens ahead, minus what refilled
    await asyncio.sleep(0.35)  # the two reserved tokens, then at least one more
    again = await conn.fetchrow(take, 5, False)
    assert 1 <= again["granted"] <= 3  # never past the burst (a slow machine may sleep longer)
    # an unknown provider has no limit
    free = await conn.fetchrow("SELECT * FROM pgnotify.take_tokens('nobody', 7)")
    assert (free["granted"], free["next_in"]) == (7, 0)


async def test_a_bucket_the_database_lost_is_recreated_from_the_workers_rate(
    conn: asyncpg.Connection,
) -> None:
    # UNLOGGED: a crash empties the table (and a standby never had it); the next take refills
    assert (
        await conn.fetchval(
            "SELECT relpersistence::text FROM pg_class WHERE oid = 'pgnotify.provider_limits'::regclass"
        )
        == "u"
    )
    took = await conn.fetchrow("SELECT * FROM pgnotify.take_tokens('p', 9, false, 20, 4)")
    assert took["granted"] == 4  # a full burst, then the rate
    row = await conn.fetchrow("SELECT rate, burst FROM pgnotify.provider_limits")
    assert (row["rate"], row["burst"]) == (20, 4)


async def test_a_pause_grants_nothing_until_it_ends_then_one_probe(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.provider_limits (provider, rate, burst, tokens) "
        "VALUES ('p', 100, 50, 50)"
    )
    left = await conn.fetchval(
        "SELECT extract(epoch FROM pgnotify.pause_provider('p', 0.3, 'x') - now())"
    )
    assert left >= 0.3
    shorter = await conn.fetchval("SELECT pgnotify.pause_provider('p', 0.1, 'y')")
    assert shorter == await conn.fetchval("SELECT paused_until FROM pgnotify.provider_limits")
    paused = await conn.fetchrow("SELECT * FROM pgnotify.take_tokens('p', 10)")
    assert paused["granted"] == 0 and 0 < paused["paused_for"] <= 0.3
    await asyncio.sleep(paused["paused_for"] + 0.005)
    after = await conn.fetchrow("SELECT * FROM pgnotify.take_tokens('p', 10)")
    # one probe at once, then the rate (a slow machine may have slept a few tokens' worth
    # longer): never the burst of 50 saved up before the 429
    assert 1 <= after["granted"] < 50


# --- the process side: which provider pays, pauses, prepaid rows (a fake store) -----------------


class FakeLimits:
    """A RateLimitStore that records calls and answers as told."""

    def __init__(self, grants: dict[str, TokenGrant]) -> None:
        self.grants = grants
        self.calls: list[tuple[Any, ...]] = []

    async def take_tokens(
        self, provider: str, wanted: int, limit: tuple[float, float], reserve: bool = False
    ) -> TokenGrant:
        self.calls.append(("take", provider, wanted, reserve))
        return self.grants[provider]

    async def give_back_tokens(self, provider: str, count: int) -> None:
        self.calls.append(("give_back", provider, count))

    async def pause_provider(self, provider: str, seconds: float, reason: str) -> float | None:
        self.calls.append(("pause", provider, seconds))
        return seconds


class Answer:
    """A provider that answers with a fixed outcome."""

    def __init__(self, name: str, outcome: Any) -> None:
        self.name = name
        self.outcome = outcome
        self.sent = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, message: RenderedMessage) -> Any:
        self.sent += 1
        return self.outcome


def message(nid: int = 1) -> RenderedMessage:
    return RenderedMessage(nid, f"pgn_{nid}", "email", "a@example.com", "s", "t", None, {})


def failover(store: FakeLimits, *providers: Answer, limited: tuple[str, ...]) -> Failover:
    slots = [
        ProviderSlot(p, CircuitBreaker(), (5.0, 5.0) if p.name in limited else None)
        for p in providers
    ]
    limits = SharedLimits(store, {s.name: s.rate for s in slots if s.rate is not None})
    return Failover({"email": ChannelProviders("email", slots)}, limits=limits)


async def test_the_claim_pays_the_first_provider_not_paused_and_its_rows_send_without_asking() -> (
    None
):
    store = FakeLimits({"a": TokenGrant(0, paused_for=2.0), "b": TokenGrant(3, next_in=0.2)})
    a, b = Answer("a", Sent()), Answer("b", Sent())
    chain = failover(store, a, b, limited=("a", "b"))
    budget = await chain.budget("email", 5)
    assert (budget.provider, budget.granted, budget.wait) == ("b", 3, 0.2)
    assert chain.limits is not None and chain.limits.paused_for("a") > 1.5  # learnt
    await chain.give_back(budget, [])  # the claim found nothing: all three go back
    assert store.calls[-1] == ("give_back", "b", 3)
    store.calls.clear()
    assert await chain.budget("email", 5) == budget  # a is skipped without asking
    assert [c[1] for c in store.calls] == ["b"]
    chain.limits.paid([1], "b")
    store.calls.clear()
    outcome, provider = await chain.send_chain("email", message(1))
    assert (type(outcome), provider, a.sent, store.calls) == (Sent, "b", 0, [])


async def test_an_unlimited_provider_costs_no_round_trip_and_its_429_pauses_nobody() -> None:
    store = FakeLimits({})
    hook = Answer("webhook", Retryable("http_429", "slow down", 5.0, throttled=True))
    chain = failover(store, hook, limited=())
    budget = await chain.budget("email", 9)
    assert (budget.provider, budget.granted) == (None, 9)
    outcome, _ = await chain.send_chain("email", message())
    assert isinstance(outcome, Retryable) and outcome.throttled
    assert store.calls == []  # a 429 of one webhook receiver delays only its row


async def test_a_429_pauses_a_limited_provider_and_the_next_rows_wait_untried() -> None:
    store = FakeLimits({"a": TokenGrant(1, ready_in=0.0)})
    a = Answer("a", Retryable("http_429", "slow down", 2.0, throttled=True))
    chain = failover(store, a, limited=("a",))
    first, _ = await chain.send_chain("email", message(1))
    assert isinstance(first, Retryable) and first.tried
    assert ("pause", "a", 2.0) in store.calls
    second, provider = await chain.send_chain("email", message(2))
    assert isinstance(second, Retryable) and not second.tried and provider == "none"
    assert second.code == "rate_limited" and second.retry_after is not None
    assert 1.5 < second.retry_after <= 2.0
    assert a.sent == 1
    budget = await chain.budget("email", 4)
    assert budget.granted == 0 and 1.5 < budget.wait <= 2.0


# --- end to end: replicas against a fake webhook receiver ----------------------------------------


def replica_env(dsn: str, name: str) -> dict[str, str]:
    return {
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_WORKER_ID": name,
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": "0",
        "PGNOTIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_RATE_LIMITS": LIMIT,
        "PGNOTIFY_POLL_INTERVAL": "1",
        "PGNOTIFY_JOBS": "false",
    }


@pytest.mark.slow
async def test_three_replica_processes_share_one_rate_limit(
    dsn: str, conn: asyncpg.Connection, webhook_sink: WebhookSink
) -> None:
    total = 240
    workers = [WorkerProcess(replica_env(dsn, f"replica-{i}")) for i in range(3)]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        await asyncio.gather(*(w.ready(timeout=30) for w in workers))
        ids = await fill(conn, webhook_sink.url, total)
        await webhook_sink.wait_for(total, timeout=total / RATE * 2 + 10)
        await wait_rows(conn, ids, DONE, timeout=10)
    finally:
        for worker in workers:
            await worker.close()

    arrivals = [r.at for r in webhook_sink.requests]
    assert len(arrivals) == total  # each once, none refused
    rate = steady_rate(arrivals)
    assert RATE * 0.9 <= rate <= RATE * 1.1, f"{rate:.2f}/s at the receiver, limit {RATE}/s"
    # burst 1: four requests need three token intervals, whoever sent them; never four inside
    # one interval (three replicas each on its own bucket would do that all the time; arrival
    # jitter on a busy machine can squeeze a few intervals, not three into one)
    ordered = sorted(arrivals)
    gaps = sorted(b - a for a, b in zip(ordered, ordered[3:], strict=False))
    assert gaps[0] >= 1 / RATE, "four requests inside one token interval"
    by_worker = dict(
        await conn.fetch(
            "SELECT worker, count(*) FROM pgnotify.events WHERE event = 'sent' GROUP BY 1"
        )
    )
    assert set(by_worker) == {"replica-0", "replica-1", "replica-2"}, by_worker
    print(f"\n{total} webhooks by 3 replicas at {rate:.2f}/s (limit {RATE}/s); {by_worker}")


async def test_a_429_on_one_replica_pauses_every_replica(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    throttled: list[Received] = []

    def answer(request: Received, _seen: int) -> web.Response:
        if len(webhook_sink.requests) == 30 and not throttled:
            throttled.append(request)
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.json_response({"ok": True})

    webhook_sink.responder = answer
    async with in_process_replicas(worker_settings) as services:
        ids = await fill(conn, webhook_sink.url, 80, max_attempts=1)
        await wait_rows(conn, ids, DONE, services[0], timeout=30)

    assert throttled
    hit = throttled[0]
    after = [r.at for r in webhook_sink.requests if r.at > hit.at]
    assert after, "nothing was sent after the 429"
    assert min(after) - hit.at >= 2.0, f"a request {min(after) - hit.at:.3f}s after the 429"
    rows = await conn.fetch(
        "SELECT status, attempts FROM pgnotify.notifications WHERE id = ANY($1)", ids
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("sent", 1)}  # max_attempts 1
    senders = await conn.fetch("SELECT DISTINCT worker FROM pgnotify.events WHERE event = 'sent'")
    assert len(senders) == 3
    # before the pause the three replicas kept to the limit together
    before = [r.at for r in webhook_sink.requests if r.at < hit.at]
    assert steady_rate(before) <= RATE * 1.1


async def test_max_attempts_1_and_a_429_ends_sent(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    webhook_sink.responder = lambda _r, seen: (
        web.Response(status=429, headers={"Retry-After": "1"})
        if seen == 1
        else web.json_response({"ok": True})
    )
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, max_attempts => 1)",
        webhook_sink.url,
    )
    async with running(worker_settings(rate_limits=LIMIT)) as service:
        [row] = await wait_rows(conn, [nid], DONE, service, timeout=10)
        paused = await conn.fetchval(
            "SELECT paused_until IS NOT NULL FROM pgnotify.provider_limits WHERE provider = 'webhook'"
        )
        status = await service.status()
    [shown] = status["rate_limits"]  # /status shows the shared limit
    assert (shown["provider"], shown["rate"], shown["burst"]) == ("webhook", 20, 1)
    assert status["channels"]["webhook"]["circuits"]["webhook"]["rate_per_second"] == 20
    assert (row["status"], row["attempts"]) == ("sent", 1)
    assert paused
    first, second = webhook_sink.requests
    assert second.at - first.at >= 1.0


async def test_an_open_circuit_for_a_while_spends_no_attempt(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    opener_key: list[str] = []

    def answer(request: Received, seen: int) -> web.Response:
        if [request.headers.get("webhook-id")] == opener_key and seen <= 3:
            return web.Response(status=503)  # the service is down for three tries
        return web.json_response({"ok": True})

    webhook_sink.responder = answer
    opener = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, max_attempts => 10)",
        webhook_sink.url,
    )
    opener_key.append(
        "pgn_"
        + await conn.fetchval("SELECT uid::text FROM pgnotify.notifications WHERE id = $1", opener)
    )
    settings = worker_settings(
        rate_limits=LIMIT, circuit_failure_threshold=1, circuit_open_seconds=1.0
    )
    async with running(settings) as service:
        await webhook_sink.wait_for(1)
        waiting = [
            await conn.fetchval(
                "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, max_attempts => 1)",
                webhook_sink.url,
            )
            for _ in range(5)
        ]
        rows = await wait_rows(conn, [opener, *waiting], DONE, service, timeout=20)
    by_id = {r["id"]: r for r in rows}
    for nid in waiting:  # they waited while the circuit was open: no attempt spent, none dead
        assert (by_id[nid]["status"], by_id[nid]["attempts"]) == ("sent", 1), dict(by_id[nid])
    assert by_id[opener]["status"] == "sent"
    first_failure = webhook_sink.requests[0].at
    during = [r for r in webhook_sink.requests[1:] if r.at - first_failure < 0.95]
    assert during == [], "a request went out while the circuit was open"


async def test_a_throttled_answer_without_a_wait_pauses_nobody() -> None:
    store = FakeLimits({"smtp": TokenGrant(1)})
    smtp = Answer("smtp", Retryable("smtp_450", "mailbox busy", None, throttled=True))
    chain = failover(store, smtp, limited=("smtp",))
    outcome, _ = await chain.send_chain("email", message())
    assert isinstance(outcome, Retryable) and outcome.throttled
    assert [c for c in store.calls if c[0] == "pause"] == []  # one mailbox, not the account
    assert chain.limits is not None and chain.limits.paused_for("smtp") == 0
