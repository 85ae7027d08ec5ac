"""The asyncpg pool and the queue repository: typed calls over adapters.queries."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from pgnotify_worker.adapters import queries
from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.models import Notification

# Errors that mean "the database is unreachable or restarting": retry with back-off.
DB_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,  # a connection broken in the middle of an operation
)
# Any failed database call: unreachable, or an error the server reported.
DB_ERRORS: tuple[type[Exception], ...] = (*DB_UNAVAILABLE, asyncpg.PostgresError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_cache_size: int = 100,
    connect_timeout: float = 10.0,
    application_name: str = "pgnotify-worker",
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python values."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        statement_cache_size=statement_cache_size,
        timeout=connect_timeout,
        command_timeout=60,
        init=_init_connection,
        server_settings={"application_name": application_name[:63]},
    )
    assert pool is not None
    return pool


@dataclass(frozen=True, slots=True)
class Completion:
    """One attempt's outcome, ready for the batched write-back."""

    id: int
    attempt: int
    status: str
    event: str
    delay: float
    error_code: str | None
    error: str | None
    provider: str | None
    provider_message_id: str | None
    duration_ms: float | None
    template_version: int | None
    refund: int = 0
    hold: str | None = None


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """A stored template version."""

    key: str
    channel: str
    locale: str
    version: int
    subject: str | None
    body: str | None
    html_body: str | None


class QueueStore:
    """The worker's view of pgnotify.*: every call is one statement and one round trip.

    The one way error text reaches the database (notifications.last_error, events.error and
    error_code, event details): each is passed through `scrubber` on the way in, so no secret,
    credential or address a provider echoed is stored, and codes are short tokens."""

    def __init__(
        self, pool: asyncpg.Pool, worker_id: str, scrubber: Scrubber | None = None
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.scrubber = scrubber or Scrubber()

    def _error(self, text: str | None) -> str | None:
        return None if text is None else self.scrubber.clean(text)

    def _detail(self, detail: dict[str, Any] | None) -> dict[str, Any] | None:
        cleaned: dict[str, Any] | None = self.scrubber.tree(detail) if detail else detail
        return cleaned

    async def claim(self, channel: str, limit: int, lease_seconds: float) -> list[Notification]:
        """Lease up to `limit` ready rows of `channel`."""
        rows = await self.pool.fetch(queries.CLAIM, channel, limit, self.worker_id, lease_seconds)
        return [
            Notification(
                id=r["id"],
                uid=r["uid"],
                channel=r["channel"],
                recipient=r["recipient"],
                user_id=r["user_id"],
                category=r["category"],
                template=r["template"],
                subject=r["subject"],
                body=r["body"],
                html_body=r["html_body"],
                locale=r["locale"],
                payload=r["payload"],
                priority=r["priority"],
                attempt=r["attempts"],
                max_attempts=r["max_attempts"],
                created_at=r["created_at"],
                claimed_at=r["claimed_at"],
                expires_at=r["expires_at"],
                digest_of=r["digest_of"],
                traceparent=r["traceparent"],
            )
            for r in rows
        ]

    async def complete(self, batch: Sequence[Completion]) -> set[int]:
        """Write outcomes; returns the ids actually written (the others lost their lease)."""
        rows = await self.pool.fetch(
            queries.COMPLETE,
            self.worker_id,
            [c.id for c in batch],
            [c.attempt for c in batch],
            [c.status for c in batch],
            [c.event for c in batch],
            [c.delay for c in batch],
            [self.scrubber.code(c.error_code) for c in batch],
            [self._error(c.error) for c in batch],
            [c.provider for c in batch],
            [c.provider_message_id for c in batch],
            [c.duration_ms for c in batch],
            [c.template_version for c in batch],
            [c.refund for c in batch],
            [c.hold for c in batch],
        )
        return {r["id"] for r in rows}

    async def heartbeat(self, held: Sequence[tuple[int, int]], lease_seconds: float) -> int:
        """Extend the leases of (id, attempt) pairs still held; returns how many."""
        rows = await self.pool.fetch(
            queries.HEARTBEAT,
            self.worker_id,
            [i for i, _ in held],
            [a for _, a in held],
            lease_seconds,
        )
        return len(rows)

    async def release(self, held: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Hand unfinished claims back; returns released counts per channel."""
        rows = await self.pool.fetch(
            queries.RELEASE, self.worker_id, [i for i, _ in held], [a for _, a in held]
        )
        return {r["channel"]: r["released"] for r in rows}

    async def reap(self, limit: int = 1000) -> list[tuple[str, int, int]]:
        """Requeue expired leases: (channel, requeued, dead) per channel."""
        rows = await self.pool.fetch(queries.REAP, limit)
        return [(r["channel"], r["requeued"], r["dead"]) for r in rows]

    async def promote(self, limit: int = 1000) -> dict[str, int]:
        """Scheduled rows that came due become ready; counts per channel."""
        rows = await self.pool.fetch(queries.PROMOTE, limit)
        return {r["channel"]: r["promoted"] for r in rows}

    async def next_due(self) -> float | None:
        """Seconds until the earliest scheduled row is due, or None."""
        value: float | None = await self.pool.fetchval(queries.NEXT_DUE)
        return value

    async def template(self, key: str, channel: str, locales: Sequence[str]) -> TemplateRow | None:
        """The newest version of a template in the best available locale."""
        row = await self.pool.fetchrow(queries.TEMPLATE, key, channel, list(locales))
        return TemplateRow(**dict(row)) if row else None

    async def inbox_deliver(
        self,
        notification_id: int,
        *,
        user_id: str,
        category: str | None,
        title: str | None,
        body: str | None,
        data: dict[str, Any],
    ) -> int:
        """Store an in-app message once; returns the inbox id."""
        value: int = await self.pool.fetchval(
            queries.INBOX_DELIVER, notification_id, user_id, category, title, body, data
        )
        return value

    async def devices_of(self, user_id: str) -> list[tuple[int, str, str]]:
        """(id, platform, token) of a user's active devices."""
        rows = await self.pool.fetch(queries.DEVICES_OF, user_id)
        return [(r["id"], r["platform"], r["token"]) for r in rows]

    async def deactivate_device(self, token: str, reason: str) -> bool:
        """Mark a push token dead; True if it was active."""
        status: str = await self.pool.execute(queries.DEACTIVATE_DEVICE, token, reason)
        return status.endswith(" 1")

    async def suppress(
        self, channel: str, address: str, reason: str, source: str, detail: dict[str, Any] | None
    ) -> None:
        """Add an address to the suppression list (once)."""
        await self.pool.execute(
            queries.SUPPRESS, channel, address, reason, source, self._detail(detail)
        )

    async def note(
        self,
        notification_id: int,
        event: str,
        attempt: int,
        *,
        provider: str | None = None,
        error_code: str | None = None,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """An extra event row (per-device push outcomes and the like)."""
        await self.pool.execute(
            queries.NOTE,
            notification_id,
            event,
            attempt,
            self.worker_id,
            provider,
            self.scrubber.code(error_code),
            self._error(error),
            self._detail(detail),
        )

    async def provider_event(
        self,
        provider: str,
        *,
        event: str,
        external_id: str,
        notification_id: int | None = None,
        provider_message_id: str | None = None,
        error_code: str | None = None,
        error: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> tuple[int, str, str, bool] | None:
        """Record an inbound report: (notification id, channel, recipient, newly stored) or None
        when no notification matches."""
        row = await self.pool.fetchrow(
            queries.PROVIDER_EVENT,
            provider,
            notification_id,
            provider_message_id,
            event,
            self.scrubber.code(error_code),
            self._error(error),
            self._detail(detail),
            external_id,
        )
        if row is None:
            return None
        return row["id"], row["channel"], row["recipient"], row["stored"] > 0

    async def send_facts(self, ids: Sequence[int], addresses: Sequence[str]) -> dict[int, Any]:
        """Facts for the preference rules, per notification id (one round trip for a batch)."""
        rows = await self.pool.fetch(queries.SEND_FACTS, list(ids), list(addresses))
        return {r["id"]: r for r in rows}

    async def queue_status(self) -> list[dict[str, Any]]:
        """The queue_status view as dicts."""
        return [dict(r) for r in await self.pool.fetch(queries.QUEUE_STATUS)]

    async def alive(self, within: float = 2.0) -> bool:
        """True when a pooled connection answers within `within` seconds."""
        try:
            await self.pool.fetchval(queries.ALIVE, timeout=within)
        except DB_ERRORS:
            return False
        return True


def utcnow() -> dt.datetime:
    """Wall-clock time, for wire formats (webhook-timestamp) and Retry-After dates only."""
    return dt.datetime.now(dt.UTC)
