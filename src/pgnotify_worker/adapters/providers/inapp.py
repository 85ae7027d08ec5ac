"""In-app messages: a pgnotify.inbox row (once per notification) and a NOTIFY for live clients."""

from __future__ import annotations

import asyncpg

from pgnotify_worker.adapters.db import DB_UNAVAILABLE, QueueStore
from pgnotify_worker.adapters.providers.spec import NoSettings, ProviderSpec
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent


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
        except DB_UNAVAILABLE:
            return Retryable("database", "inbox write failed: database unavailable")
        except asyncpg.PostgresError as exc:
            return Permanent("inbox_rejected", f"inbox write rejected: {exc.sqlstate}")
        return Sent(f"inbox-{inbox_id}")


SPECS = (
    ProviderSpec(
        "inapp", frozenset({"inapp"}), NoSettings, lambda _cfg, ctx: InAppProvider(ctx.store)
    ),
)
