"""The asyncpg pool and the queue repository: typed calls over adapters.queries."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import asyncpg

from pgnotify_worker import __version__
from pgnotify_worker.adapters import queries
from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.core.throttle import Take, Window
from pgnotify_worker.errors import PreferenceRejected, StoreError, StoreUnavailable
from pgnotify_worker.models import Completion, Notification, TemplateRow, TokenGrant

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
# Errors after which a pooled connection must not be used again.
BROKEN_CONNECTION: tuple[type[Exception], ...] = (
    asyncpg.exceptions.InternalClientError,
    asyncpg.ConnectionDoesNotExistError,
)
# Any failed database call: unreachable, an error the server reported, or either of them
# already translated by a QueueStore method.
DB_ERRORS: tuple[type[Exception], ...] = (*DB_UNAVAILABLE, asyncpg.PostgresError, StoreError)

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Driver errors leave a store method as StoreUnavailable / StoreError (ports' contract)."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except StoreError:
            raise
        except DB_UNAVAILABLE as exc:
            if isinstance(exc, BROKEN_CONNECTION) and args and isinstance(args[0], QueueStore):
                # asyncpg can hand out a pooled connection whose protocol is still consuming the
                # server's termination of it (during a restart: "cannot switch to state 12;
                # another operation (2) is in progress", MagicStack/asyncpg#1069); replace every
                # pooled connection instead of letting the next caller meet it too.
                await args[0].pool.expire_connections()
            raise StoreUnavailable(fn.__name__, exc) from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(fn.__name__, exc) from exc

    return call


class Undecodable(ValueError):
    """A claimed row holds a value the worker cannot represent."""


def _instant(name: str, epoch: float) -> dt.datetime:
    """An epoch from the claim as an aware datetime."""
    try:
        return dt.datetime.fromtimestamp(epoch, dt.UTC)
    except (OverflowError, ValueError, OSError):
        raise Undecodable(f"{name} is out of the range the worker can handle") from None


def _payload(text: str) -> dict[str, Any]:
    """The payload JSON (a row whose payload cannot be parsed here fails alone)."""
    try:
        value = json.loads(text)
    except (RecursionError, ValueError):
        raise Undecodable("payload is nested too deeply to process") from None
    if not isinstance(value, dict):
        raise Undecodable("payload is not a JSON object")
    return value


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A released connection skips asyncpg's reset query (pg_advisory_unlock_all, CLOSE ALL,
    UNLISTEN *, RESET ALL): a round trip after every statement, ~7 % of a drain's worker CPU.
    Nothing here leaves session state on a pooled connection (settings and locks are
    transaction-scoped; LISTEN and wake tokens have their own connections), and the pool still
    rolls back a transaction left open."""


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
        reset=_keep_session,
        server_settings={"application_name": application_name[:63]},
    )
    assert pool is not None
    return pool


class QueueStore:
    """The worker's view of pgnotify.*: every call is one statement and one round trip.

    The one way error text reaches the database (notifications.last_error, events.error and
    error_code, event details): each is passed through `scrubber` on the way in, so no secret,
    credential or address a provider echoed is stored, and codes are short tokens."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        worker_id: str,
        scrubber: Scrubber | None = None,
        *,
        token_dsn: str | None = None,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        # channels served by dev sinks only: rows created up to here belong to real providers
        self.claim_floor: dict[str, dt.datetime] = {}
        self.scrubber = scrubber or Scrubber()
        # Wake tokens are session locks: they need a direct connection of their own (a
        # transaction pooler would hand the session to someone else). None: never taken.
        self.token_dsn = token_dsn
        self._token_conn: asyncpg.Connection | None = None
        self._token_lock = asyncio.Lock()

    def _error(self, text: str | None) -> str | None:
        return None if text is None else self.scrubber.clean(text)

    def _detail(self, detail: dict[str, Any] | None) -> dict[str, Any] | None:
        cleaned: dict[str, Any] | None = self.scrubber.tree(detail) if detail else detail
        return cleaned

    @translated
    async def claim(self, channel: str, limit: int, lease_seconds: float) -> list[Notification]:
        """Lease up to `limit` ready rows of `channel`; a row that cannot be decoded is failed
        at once with the reason (it never stalls its batch or spends other rows' attempts)."""
        rows = await self.pool.fetch(
            queries.CLAIM,
            channel,
            limit,
            self.worker_id,
            lease_seconds,
            self.claim_floor.get(channel),
        )
        claimed: list[Notification] = []
        broken: list[Completion] = []
        for r in rows:
            # by position, in queries.CLAIM's column order (one unpacking, not 20 key lookups)
            (
                id_,
                uid,
                channel_,
                recipient,
                user_id,
                category,
                template,
                subject,
                body,
                html_body,
                locale,
                payload,
                priority,
                attempts,
                max_attempts,
                created_at,
                expires_at,
                digest_of,
                traceparent,
                claimed_at,
            ) = r
            try:
                claimed.append(
                    Notification(
                        id=id_,
                        uid=uid,
                        channel=channel_,
                        recipient=recipient,
                        user_id=user_id,
                        category=category,
                        template=template,
                        subject=subject,
                        body=body,
                        html_body=html_body,
                        locale=locale,
                        payload=_payload(payload),
                        priority=priority,
                        attempt=attempts,
                        max_attempts=max_attempts,
                        created_at=_instant("created_at", created_at),
                        claimed_at=claimed_at,
                        expires_at=None
                        if expires_at is None
                        else _instant("expires_at", expires_at),
                        digest_of=digest_of,
                        traceparent=traceparent,
                    )
                )
            except Undecodable as exc:
                broken.append(
                    Completion(
                        id=r["id"],
                        attempt=r["attempts"],
                        status="failed",
                        event="failed",
                        delay=0.0,
                        error_code="undecodable",
                        error=str(exc),
                        provider=None,
                        provider_message_id=None,
                        duration_ms=None,
                        template_version=None,
                    )
                )
        if broken:
            try:
                await self.complete(broken)
            except StoreError as exc:  # they come back when their lease expires, and die
                log.error(
                    "could not fail the notifications the worker cannot read: %s",
                    exc,
                    extra={"action": "undecodable_failed", "channel": channel},
                )
            log.error(
                "failed %s %s notification(s) the worker cannot read: %s",
                len(broken),
                channel,
                "; ".join(f"{c.id}: {c.error}" for c in broken[:5]),
                extra={"action": "undecodable", "channel": channel, "count": len(broken)},
            )
        return claimed

    @translated
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
            [c.claimed_at for c in batch],
        )
        return {r["id"] for r in rows}

    @translated
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

    @translated
    async def release(self, held: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Hand unfinished claims back; returns released counts per channel."""
        rows = await self.pool.fetch(
            queries.RELEASE, self.worker_id, [i for i, _ in held], [a for _, a in held]
        )
        return {r["channel"]: r["released"] for r in rows}

    @translated
    async def reap(self, limit: int = 1000) -> list[tuple[str, int, int]]:
        """Requeue expired leases: (channel, requeued, dead) per channel."""
        rows = await self.pool.fetch(queries.REAP, limit)
        return [(r["channel"], r["requeued"], r["dead"]) for r in rows]

    @translated
    async def promote(self, limit: int = 1000) -> dict[str, int]:
        """Scheduled rows that came due become ready; counts per channel."""
        rows = await self.pool.fetch(queries.PROMOTE, limit)
        return {r["channel"]: r["promoted"] for r in rows}

    @translated
    async def next_due(self) -> float | None:
        """Seconds until the earliest scheduled row is due, or None."""
        value: float | None = await self.pool.fetchval(queries.NEXT_DUE)
        return value

    @translated
    async def template(self, key: str, channel: str, locales: Sequence[str]) -> TemplateRow | None:
        """The newest version of a template in the best available locale."""
        row = await self.pool.fetchrow(queries.TEMPLATE, key, channel, list(locales))
        return TemplateRow(**dict(row)) if row else None

    @translated
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

    @translated
    async def inbox_deliver_many(
        self,
        rows: Sequence[tuple[int, str, str | None, str | None, str | None, dict[str, Any]]],
    ) -> dict[int, int]:
        """Store many in-app messages (notification id, user, category, title, body, data) in
        one statement; notification id -> inbox id (a retry finds the stored row)."""
        found = await self.pool.fetch(
            queries.INBOX_DELIVER_MANY,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
            [json.dumps(r[5]) for r in rows],
        )
        return {r["notification_id"]: r["id"] for r in found}

    @translated
    async def devices_of(self, user_id: str) -> list[tuple[int, str, str]]:
        """(id, platform, token) of a user's active devices."""
        rows = await self.pool.fetch(queries.DEVICES_OF, user_id)
        return [(r["id"], r["platform"], r["token"]) for r in rows]

    @translated
    async def deactivate_device(self, token: str, reason: str) -> bool:
        """Mark a push token dead; True if it was active."""
        status: str = await self.pool.execute(queries.DEACTIVATE_DEVICE, token, reason)
        return status.endswith(" 1")

    @translated
    async def suppress(
        self, channel: str, address: str, reason: str, source: str, detail: dict[str, Any] | None
    ) -> None:
        """Add an address to the suppression list (once)."""
        await self.pool.execute(
            queries.SUPPRESS, channel, address, reason, source, self._detail(detail)
        )

    @translated
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

    @translated
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

    @translated
    async def send_facts(self, ids: Sequence[int], addresses: Sequence[str]) -> dict[int, Any]:
        """Facts for the preference rules, per notification id (one round trip for a batch)."""
        rows = await self.pool.fetch(queries.SEND_FACTS, list(ids), list(addresses))
        return {r["id"]: r for r in rows}

    @translated
    async def take_throttle(self, subject: str, category: str, channel: str) -> Take | None:
        """Count one send against the category's throttle (schema 0019); None when it has none."""
        row = await self.pool.fetchrow(queries.TAKE_THROTTLE, subject, category, channel)
        if row is None or row["max_sends"] is None:
            return None
        return Take(
            allowed=row["allowed"],
            used=row["used"],
            limit=row["max_sends"],
            window=Window(row["window_start"], row["window_end"]),
            action=row["action"],
            now=row["db_now"],
        )

    @translated
    async def enqueue(
        self,
        channel: str,
        recipient: str,
        *,
        payload: dict[str, Any],
        subject: str | None = None,
        body: str | None = None,
        category: str | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> int:
        """Enqueue one notification through the SQL API (system alerts)."""
        value: int = await self.pool.fetchval(
            queries.ENQUEUE,
            channel,
            recipient,
            None,
            payload,
            subject,
            body,
            None,
            None,
            category,
            None,
            priority,
            None,
            None,
            idempotency_key,
        )
        return value

    @translated
    async def opt_out(self, user_id: str, category: str) -> None:
        """Record an unsubscribe ('*' = everything)."""
        await self.pool.fetchval(queries.OPT_OUT, user_id, category)

    @translated
    async def preferences_of(self, user_id: str) -> dict[str, Any]:
        """What the preference centre shows: categories x channels, time zone, quiet hours."""
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            categories = await conn.fetch(queries.PREFERENCE_CATEGORIES, user_id)
            contact = await conn.fetchrow(queries.PREFERENCE_CONTACT, user_id)
        quiet = None
        if contact is not None and contact["quiet_start"] is not None:
            quiet = {"start": contact["quiet_start"], "end": contact["quiet_end"]}
        return {
            "user_id": user_id,
            "categories": [
                {
                    "name": row["name"],
                    "description": row["description"],
                    "critical": row["critical"],
                    "requires_consent": row["requires_consent"],
                    "consent": row["consent"],
                    "channels": dict(zip(row["channels"], row["settings"], strict=True)),
                }
                for row in categories
            ],
            "timezone": contact["timezone"] if contact is not None else "UTC",
            "quiet_hours": quiet,
            "unsubscribed": bool(contact["unsubscribed"]) if contact is not None else False,
        }

    async def save_preferences(self, user_id: str, changes: dict[str, Any], source: str) -> int:
        """Apply a user's changes in one statement; PreferenceRejected names the bad field."""
        try:
            return int(await self.pool.fetchval(queries.SAVE_PREFERENCES, user_id, changes, source))
        except (asyncpg.CheckViolationError, asyncpg.ForeignKeyViolationError) as exc:
            message = str(getattr(exc, "message", "") or exc).removeprefix("pgnotify: ")
            raise PreferenceRejected(getattr(exc, "column_name", None), message) from None
        except DB_UNAVAILABLE as exc:
            raise StoreUnavailable("save_preferences", exc) from exc
        except asyncpg.PostgresError as exc:
            raise StoreError("save_preferences", exc) from exc

    @translated
    async def category_is_critical(self, category: str) -> bool:
        """Whether a category is critical (never unsubscribable)."""
        return bool(await self.pool.fetchval(queries.CATEGORY_IS_CRITICAL, category))

    @translated
    async def mark_real(self, channels: Sequence[str]) -> None:
        """Channels served by a real provider now: dev sinks leave rows created until now."""
        if channels:
            await self.pool.execute(queries.MARK_REAL, list(channels))

    @translated
    async def refresh_claim_floors(self, dev_only: Sequence[str]) -> None:
        """Channels this worker serves through dev sinks only claim rows created after a real
        provider last served them."""
        if dev_only:
            rows = await self.pool.fetch(queries.REAL_SEEN, list(dev_only))
            self.claim_floor = {r["channel"]: r["real_seen_at"] for r in rows}

    @translated
    async def database_health(self) -> dict[str, Any]:
        """The oldest open transaction (age in seconds and in transactions) and the dead rows
        of the queue tables: what a pinned snapshot costs."""
        oldest = await self.pool.fetchrow(queries.OLDEST_TRANSACTION)
        dead = await self.pool.fetch(queries.QUEUE_DEAD_TUPLES)
        return {
            "age_seconds": oldest["age_seconds"] if oldest else None,
            "xmin_age": oldest["xmin_age"] if oldest else None,
            "dead_tuples": {r["table"]: r["dead"] for r in dead},
        }

    @translated
    async def destinations(self) -> list[tuple[str, bool, str | None]]:
        """(origin, disabled, reason) of the destinations recorded as failing or disabled."""
        rows = await self.pool.fetch(queries.DESTINATIONS)
        return [(r["origin"], r["disabled"], r["disabled_reason"]) for r in rows]

    @translated
    async def destination_failing(
        self, origin: str, error: str, disable_after: float
    ) -> tuple[bool, float]:
        """Record a destination failing; (disabled just now, seconds failing)."""
        row = await self.pool.fetchrow(
            queries.DESTINATION_FAILING, origin, self._error(error) or "", disable_after
        )
        assert row is not None
        return bool(row["disabled_now"]), float(row["failing_seconds"])

    @translated
    async def destination_recovered(self, origin: str) -> None:
        """Forget a failing destination that answered again (a disabled one stays)."""
        await self.pool.execute(queries.DESTINATION_RECOVERED, origin)

    @translated
    async def channel_health(self, sendable: dict[str, bool], valid_for: float) -> None:
        """Record which channels this worker can send now, valid for `valid_for` seconds
        (pgnotify.sendable_backlog, the autoscaler's count, reads it)."""
        await self.pool.execute(
            queries.CHANNEL_HEALTH,
            self.worker_id,
            list(sendable),
            list(sendable.values()),
            valid_for,
            __version__,  # the console lists workers alive with their version
        )

    @translated
    async def workflow_status(self) -> dict[str, Any]:
        """Running workflow runs by state, the oldest overdue one's age, open batching windows."""
        row = await self.pool.fetchrow(queries.WORKFLOW_STATUS)
        assert row is not None
        return dict(row)

    @translated
    async def status_notify(self) -> dict[str, Any]:
        """pgnotify.status_notify as the worker's sessions see it: the setting (None when unset)
        and whether status changes are announced by NOTIFY pgnotify_status (schema 0027)."""
        row = await self.pool.fetchrow(queries.STATUS_NOTIFY)
        assert row is not None
        return dict(row)

    @translated
    async def queue_status(self) -> list[dict[str, Any]]:
        """The queue_status view as dicts."""
        return [dict(r) for r in await self.pool.fetch(queries.QUEUE_STATUS)]

    # --- shared rate limits (the RateLimitStore port) ------------------------------------------

    @translated
    async def upsert_limit(
        self, provider: str, rate: float, burst: float
    ) -> tuple[float, float] | None:
        """Store a provider's shared rate and burst; the (rate, burst) stored before, if any."""
        row = await self.pool.fetchrow(queries.LIMIT_UPSERT, provider, rate, burst)
        if row is None or row["old_rate"] is None:
            return None
        return row["old_rate"], row["old_burst"]

    @translated
    async def take_tokens(
        self, provider: str, wanted: int, limit: tuple[float, float], reserve: bool = False
    ) -> TokenGrant:
        """Take up to `wanted` tokens of a provider's shared limit (or reserve them ahead);
        `limit` (rate, burst) recreates its row if the database lost it."""
        row = await self.pool.fetchrow(
            queries.TAKE_TOKENS, provider, wanted, reserve, limit[0], limit[1]
        )
        assert row is not None
        return TokenGrant(row["granted"], row["ready_in"], row["next_in"], row["paused_for"])

    @translated
    async def give_back_tokens(self, provider: str, count: int) -> None:
        """Return granted tokens the claim did not use."""
        await self.pool.execute(queries.GIVE_BACK_TOKENS, provider, count)

    @translated
    async def pause_provider(self, provider: str, seconds: float, reason: str) -> float | None:
        """Pause a limited provider for every replica; seconds until the pause ends (None when
        the provider has no shared limit)."""
        value: float | None = await self.pool.fetchval(
            queries.PAUSE_PROVIDER, provider, seconds, self._error(reason)
        )
        return value

    @translated
    async def provider_limits(self) -> list[dict[str, Any]]:
        """Every shared limit with its balance and pause (for /status)."""
        return [dict(r) for r in await self.pool.fetch(queries.PROVIDER_LIMITS)]

    async def _on_token_connection(self, query: str, channel: str) -> bool:
        """One wake-token statement on the token connection (opened on first use). After any
        failure the session is ended, which gives back every lock it held."""
        async with self._token_lock:
            try:
                if self._token_conn is None or self._token_conn.is_closed():
                    assert self.token_dsn is not None
                    self._token_conn = await asyncpg.connect(
                        self.token_dsn,
                        timeout=10,
                        server_settings={"application_name": "pgnotify-worker wake tokens"},
                    )
                return bool(await self._token_conn.fetchval(query, channel, timeout=10))
            except BaseException:
                if self._token_conn is not None:
                    self._token_conn.terminate()
                    self._token_conn = None
                raise

    @translated
    async def wake_token(self, channel: str, hold: bool) -> bool:
        """Take (hold) or give back the channel's wake token; whether it is now held here."""
        if self.token_dsn is None:
            return False
        if not hold:
            if self._token_conn is not None:
                await self._on_token_connection(queries.WAKE_GIVE_BACK, channel)
            return False
        return await self._on_token_connection(queries.WAKE_TAKE, channel)

    @translated
    async def wake_handover_done(self, channel: str) -> bool:
        """Whether every transaction that inserted into the channel while the token was held has
        ended."""
        if self.token_dsn is None:
            return True
        return await self._on_token_connection(queries.WAKE_HANDOVER_DONE, channel)

    @translated
    async def wake_others(self, channel: str) -> None:
        """NOTIFY the channel so other replicas claim."""
        await self.pool.execute(queries.WAKE_OTHERS, channel)

    async def close_wake_tokens(self) -> None:
        """End the token session (every token it held is given back)."""
        async with self._token_lock:
            if self._token_conn is not None:
                self._token_conn.terminate()
                self._token_conn = None

    async def alive(self, within: float = 2.0) -> bool:
        """True when a pooled connection answers within `within` seconds."""
        try:
            await self.pool.fetchval(queries.ALIVE, timeout=within)
        except DB_ERRORS:
            return False
        return True
