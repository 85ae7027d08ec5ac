"""The producer's INSERT (schema 0008): the wake-up hand-over, bursts, the validation fast path,
enqueue_many() and COPY."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from pgnotify_worker.adapters import queries
from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.webhooks import WebhookSink
from tests.support.worker import running

DONE = {"sent", "failed", "dead"}
INSERT = (
    "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
    "VALUES ('webhook', 'https://hooks.example.com/in', '{}') RETURNING id"
)


class Listening:
    """A LISTEN pgnotify connection that keeps every payload it hears."""

    def __init__(self) -> None:
        self.heard: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.heard.put_nowait(str(payload))

    def drain(self) -> list[str]:
        got = []
        while not self.heard.empty():
            got.append(self.heard.get_nowait())
        return got


async def test_an_awake_worker_spares_the_producer_its_notify(dsn: str) -> None:
    worker, producer, listener = [await asyncpg.connect(dsn) for _ in range(3)]
    heard = Listening()
    await listener.add_listener("pgnotify", heard)
    try:
        await producer.fetchval(INSERT)
        assert await asyncio.wait_for(heard.heard.get(), 5) == "webhook"  # nobody awake

        assert await worker.fetchval(queries.WAKE_TAKE, "webhook") is True
        assert await worker.fetchval(queries.WAKE_TAKE, "email") is True
        other = await asyncpg.connect(dsn)
        try:  # one holder per channel: another replica does not get it
            assert await other.fetchval(queries.WAKE_TAKE, "webhook") is False
        finally:
            await other.close()
        for _ in range(5):
            await producer.fetchval(INSERT)
        await producer.execute(  # a future row wakes the scheduler whoever is awake
            "INSERT INTO pgnotify.notifications (channel, recipient, run_at) "
            "VALUES ('webhook', 'https://hooks.example.com/in', now() + interval '1 hour')"
        )
        await producer.execute(  # another channel, nobody awake on it: notified
            "INSERT INTO pgnotify.notifications (channel, recipient) VALUES ('inapp', 'u1')"
        )
        await listener.execute("SELECT 1")  # let the notifications arrive
        await asyncio.sleep(0.2)
        assert sorted(heard.drain()) == ["inapp", "scheduled"]

        assert await worker.fetchval(queries.WAKE_HANDOVER_DONE, "webhook") is True
        async with producer.transaction():  # an open transaction that saw the worker awake
            await producer.fetchval(INSERT)
            assert await worker.fetchval(queries.WAKE_GIVE_BACK, "webhook") is True
            assert await worker.fetchval(queries.WAKE_HANDOVER_DONE, "webhook") is False
        assert await worker.fetchval(queries.WAKE_HANDOVER_DONE, "webhook") is True
        await producer.fetchval(INSERT)  # token given back: notified again
        assert await asyncio.wait_for(heard.heard.get(), 5) == "webhook"
    finally:
        for c in (worker, producer, listener):
            await c.close()


async def test_the_wake_handover_never_strands_a_row(dsn: str) -> None:
    """The race of a producer's INSERT against a worker going to sleep, 2,000 times with random
    timing on both sides: every row is either seen by the worker's last claim or notified."""
    worker, producer, listener = [await asyncpg.connect(dsn) for _ in range(3)]
    heard = Listening()
    await listener.add_listener("pgnotify", heard)
    claim = await worker.prepare(
        "UPDATE pgnotify.notifications SET status = 'sent', updated_at = now() "
        "WHERE status = 'queued' RETURNING id"
    )
    rng = random.Random(12)
    seen_by_last_claim = notified = 0
    try:
        for _ in range(2000):
            assert await worker.fetchval(queries.WAKE_TAKE, "webhook") is True
            heard.drain()

            async def produce() -> int:
                await asyncio.sleep(rng.random() * 0.001)
                async with producer.transaction():
                    nid: int = await producer.fetchval(INSERT)
                    if rng.random() < 0.5:
                        await asyncio.sleep(rng.random() * 0.002)  # commit later
                return nid

            async def go_to_sleep() -> set[int]:
                await asyncio.sleep(rng.random() * 0.001)
                assert await worker.fetchval(queries.WAKE_GIVE_BACK, "webhook") is True
                while not await worker.fetchval(queries.WAKE_HANDOVER_DONE, "webhook"):
                    await asyncio.sleep(0.0002)
                return {r["id"] for r in await claim.fetch()}  # the last claim before sleeping

            nid, claimed = await asyncio.gather(produce(), go_to_sleep())
            if nid in claimed:
                seen_by_last_claim += 1
                continue
            # not seen by the last claim: it must have been notified (and is still queued)
            payload = await asyncio.wait_for(heard.heard.get(), 5)
            assert payload == "webhook", f"row {nid} was stranded"
            notified += 1
            await claim.fetch()
    finally:
        for c in (worker, producer, listener):
            await c.close()
    # both sides of the race happened many times
    assert seen_by_last_claim > 100 and notified > 100, (seen_by_last_claim, notified)


async def test_a_burst_from_32_producers_is_all_delivered(
    dsn: str, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    per_producer, producers, poll = 25, 32, 5.0
    async with running(worker_settings(poll_interval=poll)) as service:
        conns = [await asyncpg.connect(dsn) for _ in range(producers)]
        try:

            async def produce(conn: asyncpg.Connection, p: int) -> list[int]:
                ids = []
                for i in range(per_producer):
                    ids.append(
                        await conn.fetchval(
                            "INSERT INTO pgnotify.notifications (channel, recipient) "
                            "VALUES ('webhook', $1) RETURNING id",
                            f"{webhook_sink.url}/p{p}/{i}",
                        )
                    )
                    await asyncio.sleep(random.random() * 0.01)
                return ids

            batches = await asyncio.gather(*(produce(c, p) for p, c in enumerate(conns)))
            ids = [i for batch in batches for i in batch]
            rows = await wait_rows(conns[0], ids, DONE, service, timeout=60)
            waits = await conns[0].fetch(
                "SELECT n.id, extract(epoch FROM min(e.at) - n.created_at) AS wait "
                "FROM pgnotify.notifications n JOIN pgnotify.processing_timeline e "
                "ON e.notification_id = n.id AND e.event = 'claimed' "
                "WHERE n.id = ANY($1) GROUP BY n.id",
                ids,
            )
        finally:
            for c in conns:
                await c.close()
    assert {r["status"] for r in rows} == {"sent"}
    assert len(rows) == per_producer * producers
    assert len({r.path for r in webhook_sink.requests}) == per_producer * producers
    assert max(r["wait"] for r in waits) < poll  # none waited for the fallback poll


async def test_an_idle_worker_claims_a_single_insert_at_once(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, worker_settings: Callable[..., Settings]
) -> None:
    """Between inserts the worker goes back to sleep (token given back, hand-over done): each
    single INSERT notifies and is claimed at once, never by the 5 s fallback poll."""
    async with running(worker_settings(poll_interval=5.0)) as service:
        ids = []
        for i in range(10):
            ids.append(
                await conn.fetchval(
                    "INSERT INTO pgnotify.notifications (channel, recipient) "
                    "VALUES ('webhook', $1) RETURNING id",
                    f"{webhook_sink.url}/one/{i}",
                )
            )
            await wait_rows(conn, [ids[-1]], DONE, service, timeout=10)
            await asyncio.sleep(0.15)  # longer than the worker lingers awake
            assert service.worker is not None and not service.worker.wakeups.holds("webhook")
        waits = await conn.fetch(
            "SELECT extract(epoch FROM e.at - n.created_at)::float8 AS wait "
            "FROM pgnotify.notifications n JOIN pgnotify.processing_timeline e "
            "ON e.notification_id = n.id AND e.event = 'claimed' WHERE n.id = ANY($1)",
            ids,
        )
    assert max(r["wait"] for r in waits) < 1.0
    assert statistics.median(r["wait"] for r in waits) < 0.5


# --- validation: the fast path lets through exactly what the full path accepts unchanged -------

FIELDS = (
    "channel, recipient, user_id, category, template, subject, body, html_body, locale, "
    "payload, priority, max_attempts, idempotency_key, run_at, expires_at, traceparent"
)
CASES: list[dict[str, Any]] = [
    {"channel": "webhook", "recipient": "https://hooks.example.com/a?b=1#c"},
    {"channel": "webhook", "recipient": "https://hooks.example.com:8443/x"},
    {"channel": "webhook", "recipient": "http://1e100.net/x"},
    {"channel": "webhook", "recipient": "https://127.0.0.1/x"},
    {"channel": "webhook", "recipient": "https://10.1.2.3/x"},
    {"channel": "webhook", "recipient": "https://[::1]/x"},
    {"channel": "webhook", "recipient": "https://user@example.com/x"},
    {"channel": "webhook", "recipient": "https://metadata.google.internal/x"},
    {"channel": "webhook", "recipient": "https://169.254.169.254/latest"},
    {"channel": "webhook", "recipient": "ftp://example.com/x"},
    {"channel": "webhook", "recipient": "https://exa mple.com/x"},
    {"channel": "webhook", "recipient": "https://éxample.com/x"},
    {"channel": "webhook", "recipient": "https://x.example/" + "a" * 2040},
    {"channel": "inapp", "recipient": "u1"},
    {"channel": "inapp", "recipient": None, "user_id": "u1"},
    {"channel": "inapp", "recipient": "u" * 257},
    {"channel": "inapp", "recipient": " "},
    {"channel": "inapp", "recipient": "u\x01"},
    {"channel": "email", "recipient": "ada@example.com", "subject": "Hi", "body": "x"},
    {"channel": "email", "recipient": "ada@example.com", "body": "x"},
    {"channel": "email", "recipient": "ada@example.com", "subject": "Hi"},
    {"channel": "email", "recipient": "ada@example.com", "subject": "Hi", "html_body": "<p>"},
    {"channel": "email", "recipient": "ada@example.com", "template": "welcome"},
    {"channel": "email", "recipient": "ada@example.com", "template": "nope"},
    {"channel": "email", "recipient": "Ada <ada@example.com>", "subject": "Hi", "body": "x"},
    {"channel": "email", "recipient": "ada@example", "subject": "Hi", "body": "x"},
    {"channel": "email", "recipient": "ada@example.com", "subject": "a\nb", "body": "x"},
    {"channel": "email", "recipient": "ada@example.com", "subject": "s" * 999, "body": "x"},
    {"channel": "sms", "recipient": "+14155550123", "body": "hi"},
    {"channel": "sms", "recipient": "+999123456789", "body": "hi"},
    {"channel": "sms", "recipient": "+1415", "body": "hi"},
    {"channel": "sms", "recipient": "(415) 555-0123", "body": "hi"},
    {"channel": "sms", "recipient": "+14155550123"},
    {"channel": "sms", "recipient": "+14155550123", "body": "é" * 1600},
    {"channel": "sms", "recipient": "+14155550123", "body": "x" * 1601},
    {"channel": "sms", "recipient": "phone", "body": "hi"},
    {"channel": "push", "recipient": "tok-1", "body": "hi"},
    {"channel": "push", "recipient": "tok 1", "body": "hi"},
    {"channel": "push", "recipient": "tok-1", "body": "x" * 4097},
    {"channel": "push", "recipient": "tok-1"},
    {"channel": "fax", "recipient": "123"},
    {"channel": None, "recipient": "u1"},
    {"channel": "inapp", "recipient": "u1", "locale": "fr-CA"},
    {"channel": "inapp", "recipient": "u1", "locale": "french!"},
    {"channel": "inapp", "recipient": "u1", "locale": "x" * 36},
    {"channel": "inapp", "recipient": "u1", "category": "c" * 101},
    {"channel": "inapp", "recipient": "u1", "idempotency_key": ""},
    {"channel": "inapp", "recipient": "u1", "idempotency_key": "k" * 256},
    {"channel": "inapp", "recipient": "u1", "payload": "[1]"},
    {"channel": "inapp", "recipient": "u1", "payload": None},
    {"channel": "inapp", "recipient": "u1", "priority": None},
    {"channel": "inapp", "recipient": "u1", "max_attempts": 0},
    {"channel": "inapp", "recipient": "u1", "max_attempts": None},
    {"channel": "inapp", "recipient": "u1", "user_id": "u" * 257},
    {"channel": "inapp", "recipient": "u1", "body": "b" * 262145},
    {"channel": "inapp", "recipient": "u1", "html_body": "h" * 1048577},
    {"channel": "inapp", "recipient": "u1", "template": "t" * 256},
    {"channel": "push", "recipient": None, "user_id": "u1", "body": "hi"},
    {"channel": "inapp", "recipient": "u1", "category": "chat"},
    {"channel": "inapp", "recipient": "u1", "category": "short"},
    {"channel": "inapp", "recipient": "u1", "category": "long"},
    {"channel": "inapp", "recipient": "u1", "expires_at": "2030-01-01"},
    {"channel": "inapp", "recipient": "u1", "expires_at": "1999-12-31"},
    {"channel": "inapp", "recipient": "u1", "expires_at": "infinity"},
    {"channel": "inapp", "recipient": "u1", "run_at": "1999-12-31"},
    {"channel": "inapp", "recipient": "u1", "run_at": "2030-01-01"},
    {"channel": "inapp", "recipient": "u1", "run_at": None},
    {"channel": "inapp", "recipient": "u1", "run_at": None, "max_attempts": None},
    {"channel": "email", "recipient": "ada@example.com", "template": "welcome", "run_at": None},
    {"channel": "inapp", "recipient": "u1", "run_at": "-infinity"},
    {"channel": "inapp", "recipient": "u1", "run_at": "2200-01-01"},
    {
        "channel": "inapp",
        "recipient": "u1",
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    },
    {"channel": "inapp", "recipient": "u1", "traceparent": "nope"},
]


async def _outcome(conn: asyncpg.Connection, case: dict[str, Any], full_path: bool) -> object:
    """The stored row (as the producer set it), or the error, of one INSERT."""
    values = {"payload": "{}", "priority": 0, "max_attempts": 10, "run_at": "now", **case}
    columns = FIELDS + (", status" if full_path else "")
    params = [values.get(name.strip()) for name in FIELDS.split(",")]
    casts = {
        "payload": "::jsonb",
        "run_at": "::text::timestamptz",
        "expires_at": "::text::timestamptz",
    }
    placeholders = ", ".join(
        f"${i + 1}{casts.get(name.strip(), '')}" for i, name in enumerate(FIELDS.split(","))
    )
    extra = ", NULL" if full_path else ""  # status NULL: never the fast path
    returning = FIELDS.replace(
        "run_at, expires_at", "run_at = now() AS now, expires_at - now() AS expires_in"
    )
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                f"INSERT INTO pgnotify.notifications ({columns}) VALUES ({placeholders}{extra}) "
                f"RETURNING {returning}, status, attempts",
                *params,
            )
            raise _Rollback(dict(row))  # type: ignore[arg-type]
    except _Rollback as stored:
        return stored.row
    except asyncpg.PostgresError as exc:
        return (exc.sqlstate, getattr(exc, "column_name", None), str(exc), exc.hint)


class _Rollback(Exception):
    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row


async def test_the_fast_path_accepts_exactly_what_the_full_path_accepts(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) "
        "VALUES ('welcome', 'email', 'Hi', 'Hello')"
    )
    await conn.execute("SET pgnotify.webhook_allowed_networks = ''")
    await conn.execute(
        "INSERT INTO pgnotify.categories (name, ttl) VALUES ('short', '1 day'), ('long', '20 years')"
    )
    for case in CASES:
        fast = await _outcome(conn, case, full_path=False)
        full = await _outcome(conn, case, full_path=True)
        assert fast == full, case
        if isinstance(fast, tuple):  # refused: 23514, a pgnotify message naming the field
            assert fast[0] == "23514" and fast[1] and str(fast[2]).startswith("pgnotify: "), case


# --- set-based producers ---------------------------------------------------------------------------


async def test_enqueue_many_inserts_in_one_statement_and_returns_ids_in_order(
    conn: asyncpg.Connection, dsn: str
) -> None:
    first = await conn.fetchval("SELECT pgnotify.enqueue('inapp', 'u0', idempotency_key => 'k-1')")
    items = [
        {"channel": "inapp", "recipient": f"u{i}", "payload": {"n": i}} for i in range(1, 1001)
    ]
    # the same notification under a key used before, and twice in the array (a different one
    # under a used key is refused: tests/test_producer_errors.py)
    items[10] = {"channel": "inapp", "recipient": "u0", "idempotency_key": "k-1"}
    items[20]["idempotency_key"] = "k-2"
    items[30] = dict(items[20])
    items[40]["run_at"] = "2030-01-01T00:00:00Z"
    listener = await asyncpg.connect(dsn)
    heard = Listening()
    await listener.add_listener("pgnotify", heard)
    try:
        ids = await conn.fetchval("SELECT pgnotify.enqueue_many($1::jsonb)", items)
        await listener.execute("SELECT 1")
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert len(ids) == 1000
    assert ids[10] == first and ids[20] == ids[30]
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, recipient, payload, status FROM pgnotify.notifications"
        )
    }
    assert len(rows) == 1 + 999 - 1  # the one from before, 999 new minus the repeated k-2
    for i, nid in enumerate(ids, start=1):
        if i - 1 not in (10, 30):  # those two are the rows of their idempotency keys
            assert rows[nid]["recipient"] == f"u{i}"
    assert rows[ids[40]]["status"] == "scheduled"
    assert sorted(set(heard.drain())) == ["inapp", "scheduled"]  # one per channel and kind


async def test_enqueue_many_refuses_bad_input_naming_the_field_and_stores_nothing(
    conn: asyncpg.Connection,
) -> None:
    bad = [
        ({"channel": "email", "recipient": "nope", "subject": "s", "body": "b"}, "recipient"),
        ({"channel": "inapp", "recipient": "u1", "priority": 40000}, "priority"),
        ({"channel": "inapp", "recipient": "u1", "payload": [1]}, "payload"),
        ({"channel": "fax", "recipient": "u1"}, "channel"),
    ]
    for item, field in bad:
        items = [{"channel": "inapp", "recipient": "ok"}, item]
        with pytest.raises(asyncpg.CheckViolationError) as caught:
            await conn.fetchval("SELECT pgnotify.enqueue_many($1::jsonb)", items)
        assert caught.value.column_name == field
        assert str(caught.value).startswith("pgnotify: ")
    with pytest.raises(asyncpg.CheckViolationError, match="JSON array"):
        await conn.fetchval("SELECT pgnotify.enqueue_many('{}'::jsonb)")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0


async def test_copy_into_the_table_is_validated(conn: asyncpg.Connection) -> None:
    records = [("webhook", f"https://hooks.example.com/{i}") for i in range(500)]
    await conn.copy_records_to_table(
        "notifications",
        schema_name="pgnotify",
        columns=["channel", "recipient"],
        records=records,
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.notifications WHERE status = 'queued'")
        == 500
    )
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.copy_records_to_table(
            "notifications",
            schema_name="pgnotify",
            columns=["channel", "recipient"],
            records=[("webhook", "https://ok.example.com/"), ("webhook", "not a url")],
        )
    assert caught.value.column_name == "recipient"
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 500
