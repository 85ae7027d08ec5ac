"""Batch sends for broadcasts (delivery/batch.py): Resend's batch endpoint, SendGrid
personalizations and the set-based in-app write, against the fake providers and a real
database. Every notification keeps its own outcome, provider id, events and idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.support.db import wait_rows
from tests.support.worker import running

DONE = {"sent", "failed", "dead", "skipped"}
SENDER = "Acme <no-reply@acme.test>"
RESEND_KEY = "re_batch_key"
SENDGRID_KEY = "SG.batch-key"


@pytest.fixture
async def resend_fake() -> AsyncIterator[FakeResend]:
    async with FakeResend(RESEND_KEY) as fake:
        yield fake


@pytest.fixture
async def sendgrid_fake() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid(SENDGRID_KEY) as fake:
        yield fake


def resend_settings(fake: FakeResend, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "email_providers": "resend",
        "resend_api_key": RESEND_KEY,
        "resend_base_url": fake.url,
        "email_from": SENDER,
        "batch_providers": "resend,inapp",
    }
    values.update(overrides)
    return values


def sendgrid_settings(fake: FakeSendGrid, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "email_providers": "sendgrid",
        "sendgrid_api_key": SENDGRID_KEY,
        "sendgrid_base_url": fake.url,
        "email_from": SENDER,
        "batch_providers": "sendgrid",
    }
    values.update(overrides)
    return values


async def broadcast(conn: asyncpg.Connection, count: int, **columns: str) -> list[int]:
    """`count` emails to u1@example.com... in one INSERT (one transaction: one claim sees all)."""
    rows = await conn.fetch(
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, payload) "
        "SELECT 'email', 'u' || g || '@example.com', $2, $3, "
        "jsonb_build_object('n', g, 'unsubscribe_url', 'https://acme.test/u/' || g) "
        "FROM generate_series(1, $1) g RETURNING id",
        count,
        columns.get("subject", "News {{ n }}"),
        columns.get("body", "Hello, reader. Leave: {{ unsubscribe_url }}"),
    )
    return [r["id"] for r in rows]


async def events(conn: asyncpg.Connection, ids: list[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {nid: [] for nid in ids}
    for row in await conn.fetch(
        "SELECT notification_id, event FROM pgnotify.events WHERE notification_id = ANY($1) "
        "ORDER BY id",
        ids,
    ):
        found[row["notification_id"]].append(row["event"])
    return found


async def last_code(conn: asyncpg.Connection, nid: int) -> str | None:
    code: str | None = await conn.fetchval(
        "SELECT error_code FROM pgnotify.events WHERE notification_id = $1 ORDER BY id DESC LIMIT 1",
        nid,
    )
    return code


def batch_requests(fake: FakeResend) -> list[Any]:
    return [r for r in fake.requests if r.path == "/emails/batch"]


def sent_by_notification(fake: FakeResend) -> dict[int, tuple[dict[str, Any], str]]:
    """notification id (from the email's tag) -> (email, the id Resend gave it)."""
    out = {}
    for email, email_id in zip(fake.sent, fake.sent_ids, strict=True):
        (tag,) = [t for t in email["tags"] if t["name"] == "notification_id"]
        nid = int(tag["value"])
        assert nid not in out, f"notification {nid} was sent twice"
        out[nid] = (email, email_id)
    return out


# --- Resend: POST /emails/batch -------------------------------------------------------------------


async def test_a_250_recipient_broadcast_goes_out_in_3_resend_requests(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 250)
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)
        status = await service._status()
    assert status["batching"]["email"] == {"batch_size": 100, "rows_in_flight_limit": 800}
    assert status["channels"]["email"]["concurrency"] == 50

    requests = batch_requests(resend_fake)
    assert sorted(len(r.json) for r in requests) == [50, 100, 100]
    assert [r for r in resend_fake.requests if r.path == "/emails"] == []
    assert all(r.header("x-batch-validation") == "permissive" for r in requests)
    keys = [r.header("idempotency-key") for r in requests]
    assert len(set(keys)) == 3 and all(k and len(k) <= 256 for k in keys)
    sent = sent_by_notification(resend_fake)
    assert set(sent) == set(ids)
    for row in rows:  # each row sent once, with the id Resend gave its own email
        email, email_id = sent[row["id"]]
        assert (row["status"], row["attempts"], row["provider"]) == ("sent", 1, "resend")
        assert row["provider_message_id"] == email_id
        assert email["to"] == [row["recipient"]]
        n = int(row["recipient"].removeprefix("u").split("@")[0])
        assert email["subject"] == f"News {n}"
        assert email["text"] == f"Hello, reader. Leave: https://acme.test/u/{n}"
        assert email["headers"]["List-Unsubscribe"] == f"<https://acme.test/u/{n}>"
    assert len({row["provider_message_id"] for row in rows}) == 250
    assert set(map(tuple, (await events(conn, ids)).values())) == {("sent",)}


async def test_a_partly_rejected_batch_fails_only_the_rejected_emails(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 20)
    resend_fake.invalid_recipients = {"u3@example.com", "u17@example.com"}
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    assert len(batch_requests(resend_fake)) == 1
    sent = sent_by_notification(resend_fake)
    by_recipient = {row["recipient"]: row for row in rows}
    for address in ("u3@example.com", "u17@example.com"):
        bad = by_recipient.pop(address)
        assert (bad["status"], bad["attempts"]) == ("failed", 1)
        assert await last_code(conn, bad["id"]) == "resend_validation_error"
        assert "Invalid `to` field" in bad["last_error"]
        assert bad["id"] not in sent
    for row in by_recipient.values():
        assert (row["status"], row["provider_message_id"]) == ("sent", sent[row["id"]][1])
    assert len(sent) == 18


async def test_a_batch_whose_answer_was_lost_is_sent_again_without_sending_twice(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 30)
    resend_fake.lose_answers_next(1)  # Resend sent them all, then the answer was a 500
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    first, second = batch_requests(resend_fake)
    assert first.header("idempotency-key") == second.header("idempotency-key")
    assert first.body == second.body
    sent = sent_by_notification(resend_fake)  # raises when any email went out twice
    assert len(resend_fake.sent) == 30
    for row in rows:
        assert (row["status"], row["attempts"]) == ("sent", 1)
        assert row["provider_message_id"] == sent[row["id"]][1]


async def test_a_batch_that_keeps_failing_is_retried_row_by_row_later(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 10)
    resend_fake.fail_next(3, status=503)  # the first request and both same-key retries
    settings = worker_settings(**resend_settings(resend_fake, batch_retries=2))
    async with running(settings) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    assert [r.header("idempotency-key") for r in batch_requests(resend_fake)[:3]] == [
        batch_requests(resend_fake)[0].header("idempotency-key")
    ] * 3
    assert len(sent_by_notification(resend_fake)) == 10
    for row in rows:  # one attempt spent on the failed batch, sent on the next
        assert (row["status"], row["attempts"]) == ("sent", 2)
    history = await events(conn, ids)
    assert all(e[0] == "retry_scheduled" and e[-1] == "sent" for e in history.values())


async def test_a_429_pauses_the_batch_without_spending_an_attempt(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 10)
    resend_fake.rate_limit_next(1, retry_after=1)
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    first, *later = batch_requests(resend_fake)
    assert later and later[0].at - first.at >= 0.9  # Retry-After was honoured
    assert len(sent_by_notification(resend_fake)) == 10
    for row in rows:  # waiting for the provider spent no attempt
        assert (row["status"], row["attempts"]) == ("sent", 1)
    codes = await conn.fetch(
        "SELECT DISTINCT error_code FROM pgnotify.events WHERE notification_id = ANY($1) "
        "AND event = 'retry_scheduled'",
        ids,
    )
    assert [c["error_code"] for c in codes] == ["resend_rate_limited"]


async def test_batching_off_sends_one_request_per_email(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 5)
    settings = worker_settings(**resend_settings(resend_fake, batch_providers=""))
    async with running(settings) as service:
        await wait_rows(conn, ids, {"sent"}, service)
    assert [r.path for r in resend_fake.requests] == ["/emails"] * 5


async def test_suppressed_and_unsubscribed_rows_stay_out_of_the_batch(
    conn: asyncpg.Connection, resend_fake: FakeResend, worker_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.suppressions (channel, address, reason, source) "
        "VALUES ('email', 'u2@example.com', 'hard_bounce', 'test')"
    )
    ids = await broadcast(conn, 5)
    async with running(worker_settings(**resend_settings(resend_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)
    status = {row["recipient"]: row["status"] for row in rows}
    assert status.pop("u2@example.com") == "skipped"
    assert set(status.values()) == {"sent"}
    (request,) = batch_requests(resend_fake)
    assert sorted(e["to"][0] for e in request.json) == sorted(status)


# --- SendGrid: personalizations -------------------------------------------------------------------


async def test_sendgrid_personalizations_carry_each_recipients_own_data(
    conn: asyncpg.Connection, sendgrid_fake: FakeSendGrid, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 40, subject="News for you")
    async with running(worker_settings(**sendgrid_settings(sendgrid_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    (request,) = sendgrid_fake.requests  # one request for the whole broadcast
    assert len(request.json["personalizations"]) == 40
    (message_id,) = sendgrid_fake.message_ids
    by_id = {row["id"]: row for row in rows}
    for email in sendgrid_fake.emails():  # as each recipient gets it
        row = by_id.pop(int(email["custom_args"]["notification_id"]))
        n = int(row["recipient"].removeprefix("u").split("@")[0])
        assert email["to"] == row["recipient"]
        assert email["subject"] == "News for you"
        assert email["text"] == f"Hello, reader. Leave: https://acme.test/u/{n}"
        assert email["headers"]["List-Unsubscribe"] == f"<https://acme.test/u/{n}>"
        assert email["custom_args"]["idempotency_key"] == f"pgn_{row['uid']}"
        assert (row["status"], row["provider_message_id"]) == ("sent", message_id)
    assert by_id == {}


async def test_sendgrid_refused_recipients_fail_and_the_others_are_sent(
    conn: asyncpg.Connection, sendgrid_fake: FakeSendGrid, worker_settings: Callable[..., Settings]
) -> None:
    ids = await broadcast(conn, 12, subject="News")
    sendgrid_fake.invalid_recipients = {"u5@example.com", "u9@example.com"}
    async with running(worker_settings(**sendgrid_settings(sendgrid_fake))) as service:
        rows = await wait_rows(conn, ids, DONE, service)

    refused, accepted = sendgrid_fake.requests
    assert len(refused.json["personalizations"]) == 12
    assert len(accepted.json["personalizations"]) == 10
    delivered = sorted(e["to"] for e in sendgrid_fake.emails())
    assert len(delivered) == 10 and "u5@example.com" not in delivered
    for row in rows:
        if row["recipient"] in sendgrid_fake.invalid_recipients:
            assert row["status"] == "failed"
            assert await last_code(conn, row["id"]) == "sendgrid_400"
            assert "to array must at least have an email" in row["last_error"]
        else:
            assert row["status"] == "sent"


async def test_sendgrid_groups_only_emails_with_the_same_content(
    conn: asyncpg.Connection, sendgrid_fake: FakeSendGrid, worker_settings: Callable[..., Settings]
) -> None:
    news = await broadcast(conn, 6, subject="News", body="Same for all: {{ unsubscribe_url }}")
    other = await broadcast(conn, 4, subject="Other", body="Your number is {{ n }}")
    async with running(worker_settings(**sendgrid_settings(sendgrid_fake))) as service:
        await wait_rows(conn, news + other, {"sent"}, service)
    sizes = sorted(len(r.json["personalizations"]) for r in sendgrid_fake.requests)
    assert sizes == [1, 1, 1, 1, 6]  # the per-recipient number makes each "other" its own email
    texts = {e["to"]: e["text"] for e in sendgrid_fake.emails()}
    assert texts["u3@example.com"] in (
        "Same for all: https://acme.test/u/3",
        "Your number is 3",
    )


# --- in-app: one statement per batch --------------------------------------------------------------


async def test_inapp_batch_is_written_in_one_statement(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings(batch_providers="inapp")) as service:
        store = service.store
        assert store is not None
        calls: list[int] = []
        deliver_many = store.inbox_deliver_many

        async def counting(rows: Any) -> dict[int, int]:
            calls.append(len(rows))
            return await deliver_many(rows)

        store.inbox_deliver_many = counting  # type: ignore[method-assign]
        # a retried notification whose inbox row is already there is found, not added twice
        ids = [
            r["id"]
            for r in await conn.fetch(
                "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, category) "
                "SELECT 'inapp', 'user-' || g, 'Hi ' || g, 'Body', 'news' "
                "FROM generate_series(1, 300) g RETURNING id"
            )
        ]
        rows = await wait_rows(conn, ids, DONE, service)

    assert calls == [300]
    inbox = {
        r["notification_id"]: r
        for r in await conn.fetch(
            "SELECT * FROM pgnotify.inbox WHERE notification_id = ANY($1)", ids
        )
    }
    assert len(inbox) == 300
    for row in rows:
        item = inbox[row["id"]]
        assert row["status"] == "sent"
        assert row["provider_message_id"] == f"inbox-{item['id']}"
        assert (item["user_id"], item["title"], item["category"]) == (
            row["recipient"],
            f"Hi {row['recipient'].removeprefix('user-')}",
            "news",
        )


async def test_inapp_set_write_finds_rows_already_stored(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    async with running(worker_settings()) as service:
        store = service.store
        assert store is not None
        ids = [
            r["id"]
            for r in await conn.fetch(
                "INSERT INTO pgnotify.notifications (channel, recipient, body, run_at) "
                "SELECT 'inapp', 'user-' || g, 'x', now() + interval '1 hour' "
                "FROM generate_series(1, 3) g RETURNING id"
            )
        ]
        first = await store.inbox_deliver(
            ids[0], user_id="user-1", category=None, title=None, body="x", data={}
        )
        found = await store.inbox_deliver_many(
            [(nid, f"user-{i + 1}", None, None, "x", {"k": i}) for i, nid in enumerate(ids)]
        )
        again = await store.inbox_deliver_many([(ids[1], "user-2", None, None, "x", {})])
    assert found[ids[0]] == first
    assert again == {ids[1]: found[ids[1]]}
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox") == 3
    assert await conn.fetchval(
        "SELECT data FROM pgnotify.inbox WHERE notification_id = $1", ids[2]
    ) == {"k": 2}


# --- the pieces: settings, the port, the providers' whole-request answers --------------------------


def test_batch_settings_refuse_sizes_the_api_does_not_take(
    worker_settings: Callable[..., Settings],
) -> None:
    from pgnotify_worker.errors import ConfigError

    with pytest.raises(ConfigError, match="resend: a batch holds 1 to 100 messages"):
        worker_settings(batch_size="resend=500")
    with pytest.raises(ConfigError, match="twilio cannot batch"):
        worker_settings(batch_providers="twilio")
    assert worker_settings(batch_size="sendgrid=500").batch_size == {"sendgrid": 500}


def test_which_providers_batch() -> None:
    from pgnotify_worker.adapters.providers.fcm import FcmProvider
    from pgnotify_worker.adapters.providers.inapp import InAppProvider
    from pgnotify_worker.adapters.providers.resend import ResendProvider
    from pgnotify_worker.adapters.providers.sendgrid import SendGridProvider
    from pgnotify_worker.adapters.providers.webhook import WebhookProvider

    def batches(cls: type) -> bool:  # what isinstance(provider, BatchProvider) checks
        return all(hasattr(cls, name) for name in ("batch_limit", "batch_key", "send_batch"))

    assert batches(ResendProvider) and ResendProvider.batch_limit == 100
    assert batches(SendGridProvider) and SendGridProvider.batch_limit == 1000
    assert batches(InAppProvider)
    assert not batches(FcmProvider)  # FCM's batch endpoint is gone
    assert not batches(WebhookProvider)


def test_batch_tokens_count_requests() -> None:
    from pgnotify_worker.delivery.limits import Budget

    # 3 tokens paid for up to 300 rows; 250 were claimed: 3 requests, nothing to give back
    assert Budget("resend", 300, per=100).unused(250) == 0
    assert Budget("resend", 300, per=100).unused(120) == 1
    assert Budget("resend", 40, per=100).unused(0) == 1
    assert Budget("twilio", 10).unused(7) == 3


async def test_resend_batch_answers_as_a_whole_when_the_request_fails(
    resend_fake: FakeResend,
) -> None:
    from pgnotify_worker.adapters.providers.resend import ResendProvider
    from pgnotify_worker.models import Permanent, Retryable
    from tests.support.providers import notification

    provider = ResendProvider(RESEND_KEY, SENDER, base_url=resend_fake.url, timeout=2)
    await provider.start()
    try:
        messages = [_message(notification("email", f"r{i}@example.com"), i) for i in range(1, 4)]
        resend_fake.rate_limit_next(1, retry_after=7)
        throttled = await provider.send_batch(messages)
        resend_fake.fail_next(1, status=401)
        tripped = await provider.send_batch(messages)
        mixed = await provider.send_batch([*messages, _message(messages[0], 9, subject="")])
    finally:
        await provider.close()
    assert isinstance(throttled, Retryable) and throttled.throttled
    assert throttled.retry_after == 7
    assert isinstance(tripped, Retryable) and tripped.trip
    assert isinstance(mixed, list)  # a refused-before-sending email gets its own outcome
    assert [type(o).__name__ for o in mixed] == ["Sent", "Sent", "Sent", "Permanent"]
    assert isinstance(mixed[3], Permanent) and mixed[3].code == "no_subject"


def _message(source: Any, nid: int, subject: str = "Hi") -> Any:
    from dataclasses import replace

    from pgnotify_worker.models import RenderedMessage

    if isinstance(source, RenderedMessage):
        return replace(source, notification_id=nid, idempotency_key=f"pgn_{nid}", subject=subject)
    return RenderedMessage(
        notification_id=nid,
        idempotency_key=f"pgn_{nid}",
        channel="email",
        recipient=source.recipient,
        subject=subject,
        text="Hello",
        html=None,
        data={},
    )
