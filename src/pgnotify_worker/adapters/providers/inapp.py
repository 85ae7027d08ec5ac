"""In-app messages: a pgnotify.inbox row (once per notification) and a NOTIFY for live clients."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from pgnotify_worker.adapters.db import DB_UNAVAILABLE, QueueStore
from pgnotify_worker.adapters.providers.spec import NoSettings, ProviderSpec
from pgnotify_worker.errors import StoreError, StoreUnavailable
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent

UNAVAILABLE: tuple[type[Exception], ...] = (StoreUnavailable, *DB_UNAVAILABLE)


class InAppProvider:
    """Writes the inbox row; the inbox trigger sends NOTIFY pgnotify_inbox."""

    name = "inapp"

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, message: RenderedMessage) -> Outcome:
        try:
            inbox_id = await self.store.inbox_deliver(
                message.notification_id,
                user_id=message.recipient,
                category=message.category,
                title=message.subject,
                body=message.text,
                data=message.data,
            )
        except UNAVAILABLE:  # the store translates driver errors
            return Retryable("database", "inbox write failed: database unavailable")
        except (StoreError, asyncpg.PostgresError) as exc:
            state = getattr(exc.__cause__ if isinstance(exc, StoreError) else exc, "sqlstate", "")
            return Permanent("inbox_rejected", f"inbox write rejected: {state}")
        return Sent(f"inbox-{inbox_id}")

    batch_limit = 1000  # rows of one INSERT ... SELECT FROM unnest(...)

    def batch_key(self, message: RenderedMessage) -> str:
        """Any in-app messages may share a statement."""
        return "inbox"

    async def send_batch(self, messages: Sequence[RenderedMessage]) -> list[Outcome] | Outcome:
        """One statement writes every inbox row (a retry finds those already written). A row
        the database refuses fails the statement: then each is written alone and gets its own
        answer."""
        rows = [
            (m.notification_id, m.recipient, m.category, m.subject, m.text, m.data)
            for m in messages
        ]
        try:
            stored = await self.store.inbox_deliver_many(rows)
        except UNAVAILABLE:
            return Retryable("database", "inbox write failed: database unavailable")
        except (StoreError, asyncpg.PostgresError):
            return [await self.send(m) for m in messages]
        return [
            Sent(f"inbox-{stored[m.notification_id]}")
            if m.notification_id in stored
            else Retryable("inbox_missing", "inbox row not found after the write")
            for m in messages
        ]


SPECS = (
    ProviderSpec(
        "inapp", frozenset({"inapp"}), NoSettings, lambda _cfg, ctx: InAppProvider(ctx.store)
    ),
)
