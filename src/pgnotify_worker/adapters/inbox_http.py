"""The inbox feed for apps (docs/inbox.md): per-user HTTP API over pgnotify.inbox and a live feed
of server-sent events, authenticated by the app's user tokens (core.app_tokens).

    GET  /inbox/messages?limit=&cursor=&category=&archived=false|true|any   newest first
    GET  /inbox/counts                                                     total, unread, unseen
    POST /inbox/messages/{read,seen,archive,unread,unarchive}  {"ids": [..]} or {"all": true}
    GET  /inbox/stream                                                     text/event-stream

Every statement is scoped to the token's `sub`: a token never reaches another user's rows. The
stream alone also accepts `?token=` (EventSource cannot send headers). One LISTEN pgnotify_inbox
connection per process feeds every open stream: a batch of NOTIFYs costs one query for the rows
and one for the counts, whatever the number of streams, and each event is encoded once per user.
Streams are capped per user (one more closes that user's oldest) and per process (429)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.db import DB_ERRORS, DB_UNAVAILABLE, translated
from pgnotify_worker.core import app_tokens
from pgnotify_worker.core.backoff import Backoff
from pgnotify_worker.errors import AppTokenError, StoreUnavailable
from pgnotify_worker.ports import InboxMetrics

log = logging.getLogger(__name__)

CHANNEL = "pgnotify_inbox"
PREFIX = "/inbox/"
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_IDS = 1000
REPLAY_LIMIT = 500  # a reconnect that missed more gets a `reset` event: refetch the list
HEARTBEAT_SECONDS = 15.0
STREAM_QUEUE = 256  # events waiting for one slow client; past it the stream ends (it reconnects)
MAX_STREAMS = 10_000  # open streams per process (PGNOTIFY_INBOX_MAX_STREAMS)
MAX_STREAMS_PER_USER = 8  # per user and process (PGNOTIFY_INBOX_MAX_STREAMS_PER_USER)
RETRY_AFTER = 10  # seconds a stream refused at the process cap is told to wait
CHALLENGE = 'Bearer realm="pgnotify inbox"'
ARCHIVED = ("false", "true", "any")
PAGES = {
    ("false", False): queries.INBOX_PAGE,
    ("false", True): queries.INBOX_PAGE_CATEGORY,
    ("true", False): queries.INBOX_PAGE_ARCHIVED,
    ("true", True): queries.INBOX_PAGE_ARCHIVED_CATEGORY,
    ("any", False): queries.INBOX_PAGE_ANY,
    ("any", True): queries.INBOX_PAGE_ANY_CATEGORY,
}
MARKS = {  # action: (statement for ids, statement for all or None)
    "read": (queries.INBOX_READ, queries.INBOX_READ_ALL),
    "seen": (queries.INBOX_SEEN, queries.INBOX_SEEN_ALL),
    "archive": (queries.INBOX_ARCHIVE, queries.INBOX_ARCHIVE_ALL),
    "unread": (queries.INBOX_UNREAD, None),
    "unarchive": (queries.INBOX_UNARCHIVE, None),
}
NO_ID = 2**63 - 1
CURSOR = re.compile(r"i([1-9][0-9]{0,18})")
HEADERS = {"Cache-Control": "no-store"}
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass events through as they come
}
PoolFn = Callable[[], asyncpg.Pool | None]
LISTEN_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ConnectionError)


class BadRequest(ValueError):
    """A parameter or body the API cannot use (400, with this message)."""


# --- encoding ------------------------------------------------------------------------------------


def _instant(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def message(row: asyncpg.Record) -> dict[str, Any]:
    """One inbox row as the API and the stream show it."""
    return {
        "id": row["id"],
        "seq": row["seq"],
        "notification_id": row["notification_id"],
        "category": row["category"],
        "title": row["title"],
        "body": row["body"],
        "data": row["data"],
        "created_at": _instant(row["created_at"]),
        "read_at": _instant(row["read_at"]),
        "seen_at": _instant(row["seen_at"]),
        "archived_at": _instant(row["archived_at"]),
    }


def counts(row: asyncpg.Record | None) -> dict[str, int]:
    """total, unread (not read, not archived), unseen (not seen, not archived)."""
    if row is None:
        return {"total": 0, "unread": 0, "unseen": 0}
    return {"total": row["total"], "unread": row["unread"], "unseen": row["unseen"]}


def encode_cursor(last_id: int) -> str:
    """Opaque to clients: where the next page starts."""
    return base64.urlsafe_b64encode(f"i{last_id}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    """The id below which the next page starts, or BadRequest."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadRequest("cursor is not one this API gave out") from None
    found = CURSOR.fullmatch(raw)
    if found is None or int(found.group(1)) >= NO_ID:
        raise BadRequest("cursor is not one this API gave out")
    return int(found.group(1))


def sse(event: str, data: object, event_id: int | None = None) -> bytes:
    """One server-sent event (data is JSON on one line, so no field splitting is needed)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


# --- storage -------------------------------------------------------------------------------------


class InboxStore:
    """The inbox statements, each scoped to one user; driver errors leave as StoreError."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        self.pool = pool

    @translated
    async def page(
        self, user_id: str, before: int, limit: int, archived: str, category: str | None
    ) -> list[asyncpg.Record]:
        """Newest first below id `before`."""
        sql = PAGES[(archived, category is not None)]
        args: tuple[object, ...] = (user_id, before, limit)
        if category is not None:
            args = (*args, category)
        rows: list[asyncpg.Record] = await self.pool.fetch(sql, *args)
        return rows

    @translated
    async def counts(self, user_id: str) -> asyncpg.Record | None:
        """The user's counts row."""
        row: asyncpg.Record | None = await self.pool.fetchrow(queries.INBOX_COUNTS, user_id)
        return row

    @translated
    async def counts_many(self, user_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        """Counts of several users (missing: no rows)."""
        rows = await self.pool.fetch(queries.INBOX_COUNTS_MANY, list(user_ids))
        return {row["user_id"]: row for row in rows}

    @translated
    async def mark(self, action: str, user_id: str, ids: Sequence[int] | None) -> int:
        """Apply `action` to the user's rows `ids` (None: all); how many changed."""
        by_ids, every = MARKS[action]
        if ids is None:
            assert every is not None
            changed: int = await self.pool.fetchval(every, user_id)
        else:
            changed = await self.pool.fetchval(by_ids, user_id, list(ids))
        return changed

    @translated
    async def since(self, user_id: str, after: int, limit: int) -> list[asyncpg.Record]:
        """The user's rows added or changed after seq `after`, oldest first."""
        rows: list[asyncpg.Record] = await self.pool.fetch(
            queries.INBOX_SINCE, user_id, after, limit
        )
        return rows

    @translated
    async def latest_seq(self, user_id: str) -> int:
        """The highest seq of the user's rows (0: none)."""
        value: int = await self.pool.fetchval(queries.INBOX_LATEST_SEQ, user_id)
        return value

    @translated
    async def feed_batch(
        self, positions: dict[str, int], limit: int
    ) -> dict[str, list[asyncpg.Record]]:
        """For each user, rows after their position (seq), oldest first, up to `limit` each."""
        users = list(positions)
        rows = await self.pool.fetch(
            queries.INBOX_FEED_BATCH, users, [positions[u] for u in users], limit
        )
        out: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            out.setdefault(row["user_id"], []).append(row)
        return out

    @translated
    async def rows(self, ids: Sequence[int]) -> list[asyncpg.Record]:
        """Rows by id (new rows whose seq is below what the feed has already passed)."""
        found: list[asyncpg.Record] = await self.pool.fetch(queries.INBOX_ROWS, list(ids))
        return found


# --- the live feed -------------------------------------------------------------------------------

Item = tuple[int, bytes, int]  # (seq or 0, encoded events, how many `message` events in them)


@dataclass(eq=False, slots=True)
class Stream:
    """One open event stream: what waits to be written to it. A list and one future rather
    than an asyncio.Queue (three deques and an Event): thousands of idle streams add up."""

    user_id: str
    items: list[Item] = field(default_factory=list)
    waiter: asyncio.Future[None] | None = None
    sent: set[int] = field(default_factory=set)  # seqs replayed: not written twice
    overflowed: bool = False
    ended: str | None = None  # why the hub ended it (user_limit, server_stopping)

    def put(self, item: Item, *, force: bool = False) -> None:
        """Queue an event; past STREAM_QUEUE the client is too slow and the stream ends."""
        if force:
            self.items.clear()
        elif len(self.items) >= STREAM_QUEUE:
            self.overflowed = True
            return
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def end(self, reason: str, last: bytes = b"") -> None:
        """End the stream now: `last` (if any) is the final write, nothing queued goes out."""
        self.ended = reason
        self.put((0, last, 0), force=True)

    async def get(self) -> Item:
        """The next event, waiting for one."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.pop(0)


@dataclass(eq=False, slots=True)
class Group:
    """The streams of one user, oldest first (a dict keeps the order), and how far the feed has
    read that user's rows."""

    streams: dict[Stream, None] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Notice:
    """A NOTIFY pgnotify_inbox we care about (a user with open streams)."""

    user_id: str
    new_id: int | None
    seq: int


class FeedHub:
    """LISTEN pgnotify_inbox on one connection and fan events out to the streams of each user.
    The feed's queries run on that same connection: one connection in all, its statements
    prepared once (a pooled connection's first use cost tens of milliseconds), never waiting
    for the delivery work's pool."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 10.0,
        batch_limit: int = 100,
        max_streams: int = MAX_STREAMS,
        max_streams_per_user: int = MAX_STREAMS_PER_USER,
    ) -> None:
        self.dsn = dsn
        self.max_streams = max_streams
        self.max_streams_per_user = max_streams_per_user
        self.open = 0  # streams subscribed now (every group's, kept as they come and go)
        self.stopping = False
        self.conn: asyncpg.Connection | None = None
        self.connect_timeout = connect_timeout
        self.batch_limit = batch_limit
        self.groups: dict[str, Group] = {}
        self.pending: list[Notice] = []
        self.wake = asyncio.Event()
        self.listening = asyncio.Event()
        self.delivered = 0

    @property
    def streams(self) -> int:
        """Open streams."""
        return self.open

    def admits(self, user_id: str) -> bool:
        """Would subscribe() take a stream of `user_id` now? (Under the process cap, or the
        user is at their own cap, so their oldest stream makes room.)"""
        group = self.groups.get(user_id)
        at_user_cap = group is not None and len(group.streams) >= self.max_streams_per_user
        return self.open < self.max_streams or at_user_cap

    def subscribe(self, user_id: str, position: int) -> Stream | None:
        """A stream of `user_id`; the user's feed starts at `position` if it is new. At the
        user's cap their oldest stream ends (a `closed` event) to make room; at the process cap
        None (the caller answers 429)."""
        group = self.groups.get(user_id)
        if group is not None:
            while len(group.streams) >= self.max_streams_per_user:
                oldest = next(iter(group.streams))
                self.unsubscribe(oldest)
                oldest.end("user_limit", sse("closed", self.evicted_reason()))
        if self.open >= self.max_streams:
            return None
        group = self.groups.get(user_id)
        if group is None:
            group = self.groups[user_id] = Group(seq=position)
        stream = Stream(user_id)
        group.streams[stream] = None
        self.open += 1
        return stream

    def evicted_reason(self) -> dict[str, object]:
        """The data of the `closed` event of a stream ended for a newer one of its user."""
        return {
            "reason": f"this user opened more than {self.max_streams_per_user} streams "
            "(PGNOTIFY_INBOX_MAX_STREAMS_PER_USER): the oldest one is closed",
            "limit": "PGNOTIFY_INBOX_MAX_STREAMS_PER_USER",
        }

    def unsubscribe(self, stream: Stream) -> None:
        """Forget a closed stream (and its user's group when it was the last); idempotent."""
        group = self.groups.get(stream.user_id)
        if group is None or stream not in group.streams:
            return
        del group.streams[stream]
        self.open -= 1
        if not group.streams:
            del self.groups[stream.user_id]

    def close_all(self) -> None:
        """Shutdown: every stream ends now (clients reconnect to another replica)."""
        self.stopping = True
        for group in self.groups.values():
            for stream in group.streams:
                stream.end("server_stopping")

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        """asyncpg's callback: keep notices of users with open streams."""
        try:
            notice = json.loads(str(payload))
            user_id = notice["user_id"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(user_id, str) or user_id not in self.groups:
            return
        new_id = notice.get("id") if notice.get("event") == "new" else None
        seq = notice.get("seq")
        self.pending.append(
            Notice(
                user_id,
                new_id if isinstance(new_id, int) else None,
                seq if isinstance(seq, int) else 0,
            )
        )
        self.wake.set()

    async def run(self) -> None:
        """Listen and dispatch until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen())
            tasks.create_task(self._dispatch_loop())

    async def _listen(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=self.connect_timeout,
                    statement_cache_size=0,
                    server_settings={"application_name": "pgnotify-worker inbox feed"},
                )
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for typename in ("json", "jsonb"):
                    await conn.set_type_codec(
                        typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                    )
                await conn.add_listener(CHANNEL, self.on_notify)
                warm = InboxStore(conn)  # prepare the feed's statements now, not on a message
                await warm.feed_batch({}, 1)
                await warm.rows([])
                await warm.counts_many([])
                self.conn = conn
                self.listening.set()
                backoff.reset()
                # what happened while we were not listening: every user's feed catches up
                for user_id, group in self.groups.items():
                    self.pending.append(Notice(user_id, None, group.seq))
                self.wake.set()
                await lost.wait()
                raise ConnectionError("inbox LISTEN connection closed by the server")
            except LISTEN_ERRORS as exc:
                self.listening.clear()
                log.warning(
                    "inbox feed listener lost (%s); reconnecting in about %.1fs",
                    f"{type(exc).__name__}: {exc}"[:300],
                    backoff.peek(),
                    extra={"action": "inbox_listener_lost"},
                )
            finally:
                self.listening.clear()
                self.conn = None
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff.next())

    async def _dispatch_loop(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            await self.wake.wait()
            await self.listening.wait()  # its queries run on the LISTEN connection
            self.wake.clear()
            batch, self.pending = self.pending, []
            try:
                await self.dispatch(batch)
                backoff.reset()
            except DB_ERRORS as exc:
                log.warning(
                    "inbox feed could not read rows (%s)",
                    f"{type(exc).__name__}: {exc}"[:300],
                    extra={"action": "inbox_feed_failed"},
                )
                self.pending = batch + self.pending  # try again: nothing is lost
                await asyncio.sleep(backoff.next())
                self.wake.set()

    async def dispatch(self, batch: Sequence[Notice]) -> None:
        """Send each user's new and changed rows, then their counts, to their open streams."""
        users = {n.user_id for n in batch if n.user_id in self.groups}
        if not users:
            return
        if self.conn is None:
            raise StoreUnavailable("inbox feed", ConnectionError("the feed is reconnecting"))
        store = InboxStore(self.conn)
        positions = {u: self.groups[u].seq for u in users}
        found = await store.feed_batch(positions, self.batch_limit)
        # new rows that committed after rows with a higher seq (concurrent producers)
        late = [
            n.new_id
            for n in batch
            if n.new_id is not None and n.user_id in positions and n.seq <= positions[n.user_id]
        ]
        if late:
            for row in await store.rows(late):
                if row["user_id"] in positions:
                    found.setdefault(row["user_id"], []).insert(0, row)
        tallies = await store.counts_many(sorted(users))
        for user_id in users:
            group = self.groups.get(user_id)
            if group is None:
                continue
            rows = found.get(user_id, [])
            events: list[Item] = [
                (row["seq"], sse("message", message(row), row["seq"]), 1) for row in rows
            ]
            if len(rows) >= self.batch_limit:
                reset = sse("reset", {"reason": "many changes: fetch the list again"})
                events.append((0, reset, 0))
            if rows:
                group.seq = max(group.seq, *(row["seq"] for row in rows))
            events.append((0, sse("counts", counts(tallies.get(user_id))), 0))
            joined = (0, b"".join(data for _seq, data, _n in events), len(rows))  # one write
            for stream in list(group.streams):
                if stream.sent:  # just replayed: let the writer drop what the replay sent
                    for item in events:
                        stream.put(item)
                else:
                    stream.put(joined)
                self.delivered += 1


# --- HTTP ----------------------------------------------------------------------------------------


def _json_error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": reason}, status=status, headers={**HEADERS, **(headers or {})}
    )


def _int(value: str | None, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", value) or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(value)


class NoMetrics:
    """InboxMetrics that record nothing (no registry given)."""

    def inbox_stream_opened(self) -> None:
        """Nothing."""

    def inbox_stream_closed(self, reason: str) -> None:
        """Nothing."""

    def inbox_stream_refused(self, reason: str) -> None:
        """Nothing."""

    def inbox_messages(self, count: int) -> None:
        """Nothing."""


class InboxApi:
    """The routes, the token check and CORS; `pool` is a callable (the pool comes up later)."""

    def __init__(
        self,
        secret: bytes,
        pool: PoolFn,
        hub: FeedHub,
        *,
        max_lifetime: int = 86_400,
        audience: str | None = None,
        cors_origins: Sequence[str] = (),
        heartbeat: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.time,
        metrics: InboxMetrics | None = None,
    ) -> None:
        self.secret = secret
        self.metrics: InboxMetrics = metrics if metrics is not None else NoMetrics()
        self.pool = pool
        self.hub = hub
        self.max_lifetime = max_lifetime
        self.audience = audience
        self.cors_origins = frozenset(cors_origins)
        self.heartbeat = heartbeat
        self.clock = clock

    def routes(self, app: web.Application) -> None:
        """Add the inbox routes, CORS and the feed's lifetime to `app`."""
        app.router.add_get("/inbox/messages", self.list_messages, allow_head=False)
        app.router.add_get("/inbox/counts", self.get_counts, allow_head=False)
        app.router.add_post("/inbox/messages/{action}", self.mark)
        app.router.add_get("/inbox/stream", self.stream, allow_head=False)
        app.router.add_route("OPTIONS", "/inbox/{tail:.*}", self.preflight)
        app.on_response_prepare.append(self._cors)
        app.on_shutdown.append(self._shutdown)
        app.cleanup_ctx.append(self._run_hub)

    async def _run_hub(self, _app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.hub.run(), name="inbox-feed")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _shutdown(self, _app: web.Application) -> None:
        self.hub.close_all()

    # --- CORS ------------------------------------------------------------------------------

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        if not request.path.startswith(PREFIX):
            return
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() in self.cors_origins:
            # never "*": the Authorization header is a credential
            response.headers["Access-Control-Allow-Origin"] = origin

    async def preflight(self, request: web.Request) -> web.Response:
        """CORS preflight: allowed origins may send Authorization with GET and POST."""
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        if origin is None or method is None:
            return _json_error(400, "not a CORS preflight (Origin and -Request-Method needed)")
        if origin.lower() not in self.cors_origins:
            return _json_error(403, "origin is not in PGNOTIFY_APP_CORS_ORIGINS")
        if method not in ("GET", "POST"):
            return _json_error(403, f"method {method} is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                "Access-Control-Max-Age": "600",
            },
        )

    # --- auth ------------------------------------------------------------------------------

    def _user(self, request: web.Request, *, query_token: bool = False) -> app_tokens.AppToken:
        """The token's user, or an HTTP 401 saying why (never echoing the token)."""
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        token = given.strip() if scheme.lower() == "bearer" else ""
        if not token and query_token:
            token = request.query.get("token", "")
        if not token:
            where = "Authorization: Bearer <token>" + (" or ?token=" if query_token else "")
            raise self._refuse(f"send the user token as {where}", CHALLENGE)
        try:
            return app_tokens.verify(
                self.secret,
                token,
                int(self.clock()),
                max_lifetime_seconds=self.max_lifetime,
                audience=self.audience,
            )
        except AppTokenError as exc:
            reason = str(exc)
            safe = reason.replace('"', "'")
            raise self._refuse(
                reason,
                f'{CHALLENGE}, error="invalid_token", error_description="{safe}"',
            ) from None

    @staticmethod
    def _refuse(reason: str, challenge: str) -> web.HTTPUnauthorized:
        return web.HTTPUnauthorized(
            text=json.dumps({"error": reason}),
            content_type="application/json",
            headers={**HEADERS, "WWW-Authenticate": challenge},
        )

    def _store(self) -> InboxStore:
        pool = self.pool()
        if pool is None:
            raise StoreUnavailable("inbox", ConnectionError("no database pool yet"))
        return InboxStore(pool)

    # --- endpoints -------------------------------------------------------------------------

    async def list_messages(self, request: web.Request) -> web.Response:
        """A page of the user's messages, newest first, and the cursor of the next."""
        user = self._user(request)
        query = request.query
        try:
            unknown = set(query) - {"limit", "cursor", "category", "archived"}
            if unknown:
                raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
            limit = _int(query.get("limit"), "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
            cursor = query.get("cursor")
            before = decode_cursor(cursor) if cursor else NO_ID
            archived = query.get("archived", "false")
            if archived not in ARCHIVED:
                raise BadRequest("archived must be false, true or any")
            category = query.get("category") or None
            if category is not None and len(category) > 200:
                raise BadRequest("category is too long")
        except BadRequest as exc:
            return _json_error(400, str(exc))
        try:
            rows = await self._store().page(user.user_id, before, limit + 1, archived, category)
        except DB_ERRORS as exc:
            return self._unavailable(exc)
        more = len(rows) > limit
        rows = rows[:limit]
        return web.json_response(
            {
                "messages": [message(row) for row in rows],
                "next_cursor": encode_cursor(rows[-1]["id"]) if more else None,
            },
            headers=HEADERS,
            dumps=lambda o: json.dumps(o, default=str),
        )

    async def get_counts(self, request: web.Request) -> web.Response:
        """total, unread and unseen."""
        user = self._user(request)
        try:
            row = await self._store().counts(user.user_id)
        except DB_ERRORS as exc:
            return self._unavailable(exc)
        return web.json_response(counts(row), headers=HEADERS)

    async def mark(self, request: web.Request) -> web.Response:
        """Mark one, several ({"ids": [..]}) or all ({"all": true}) of the user's messages."""
        user = self._user(request)
        action = request.match_info["action"]
        if action not in MARKS:
            return _json_error(404, f"no such action: use one of {', '.join(MARKS)}")
        try:
            ids = await self._mark_body(request, every_allowed=MARKS[action][1] is not None)
        except BadRequest as exc:
            return _json_error(400, str(exc))
        try:
            store = self._store()
            changed = await store.mark(action, user.user_id, ids)
            row = await store.counts(user.user_id)
        except DB_ERRORS as exc:
            return self._unavailable(exc)
        return web.json_response({"changed": changed, "counts": counts(row)}, headers=HEADERS)

    @staticmethod
    async def _mark_body(request: web.Request, *, every_allowed: bool) -> list[int] | None:
        if request.content_type != "application/json":
            raise BadRequest("send a JSON body (Content-Type: application/json)")
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("body is not JSON") from None
        if not isinstance(body, dict) or set(body) - {"ids", "all"}:
            raise BadRequest('body must be {"ids": [..]} or {"all": true}')
        if body.get("all") is True and "ids" not in body:
            if not every_allowed:
                raise BadRequest("this action takes ids only")
            return None
        ids = body.get("ids")
        if (
            "all" in body
            or not isinstance(ids, list)
            or not ids
            or len(ids) > MAX_IDS
            or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
        ):
            raise BadRequest(
                f'body must be {{"ids": [..]}} (1 to {MAX_IDS} positive integers) or '
                '{"all": true}'
            )
        return sorted(set(ids))

    @staticmethod
    def _unavailable(exc: Exception) -> web.Response:
        log.warning(
            "inbox API: database error %s", type(exc).__name__, extra={"action": "inbox_db_error"}
        )
        status = 503 if isinstance(exc, (*DB_UNAVAILABLE, StoreUnavailable)) else 500
        return _json_error(status, "the inbox is not available right now; try again")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `message` (a new or changed row, id = its seq), `counts`,
        `reset` (refetch the list), `expired` (the token ran out: reconnect with a new one)."""
        user = self._user(request, query_token=True)
        last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        try:
            after = _int(last, "Last-Event-ID", 0, NO_ID, -1) if last else None
        except BadRequest as exc:
            return _json_error(400, str(exc))
        if self.hub.stopping:
            self.metrics.inbox_stream_refused("server_stopping")
            return _json_error(503, "this server is stopping: connect again", {"Retry-After": "1"})
        if not self.hub.admits(user.user_id):  # before any query: a refusal costs nothing
            return self._full()
        try:
            store = self._store()
            start = await store.latest_seq(user.user_id)
        except DB_ERRORS as exc:
            self.metrics.inbox_stream_refused("unavailable")
            return self._unavailable(exc)
        # subscribe, then replay from the client's position (or from `start`: a row committed
        # before the subscription took effect is in the replay); a row both the replay and the
        # live feed carry is written once (stream.sent)
        feed = self.hub.subscribe(user.user_id, start)
        if feed is None:
            return self._full()
        try:
            return await self._serve(request, store, feed, user, start if after is None else after)
        finally:
            self.hub.unsubscribe(feed)

    def _full(self) -> web.Response:
        """429: the process serves PGNOTIFY_INBOX_MAX_STREAMS streams already."""
        self.metrics.inbox_stream_refused("process_limit")
        log.warning(
            "inbox stream refused: %s streams open (PGNOTIFY_INBOX_MAX_STREAMS)",
            self.hub.max_streams,
            extra={"action": "inbox_stream_refused"},
        )
        return _json_error(
            429,
            f"this server has {self.hub.max_streams} open streams, its limit "
            f"(PGNOTIFY_INBOX_MAX_STREAMS): try again in {RETRY_AFTER} s",
            {"Retry-After": str(RETRY_AFTER)},
        )

    async def _serve(
        self,
        request: web.Request,
        store: InboxStore,
        feed: Stream,
        user: app_tokens.AppToken,
        after: int,
    ) -> web.StreamResponse:
        first: list[bytes] = [b"retry: 2000\n\n"]
        replayed = 0
        try:
            rows = await store.since(user.user_id, after, REPLAY_LIMIT + 1)
            if len(rows) > REPLAY_LIMIT:
                first.append(sse("reset", {"reason": "missed too much: fetch the list again"}))
            else:
                for row in rows:
                    feed.sent.add(row["seq"])
                    first.append(sse("message", message(row), row["seq"]))
                replayed = len(rows)
            first.append(sse("counts", counts(await store.counts(user.user_id))))
        except DB_ERRORS as exc:
            self.metrics.inbox_stream_refused("unavailable")
            return self._unavailable(exc)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        self.metrics.inbox_stream_opened()
        reason = "client_closed"  # unless the loop learns better: a failed write, a cancel
        try:
            await response.write(b"".join(first))
            if replayed:
                self.metrics.inbox_messages(replayed)
            while True:
                left = user.expires_at - self.clock()
                if left <= 0:
                    await response.write(sse("expired", {"reason": "token expired: reconnect"}))
                    reason = "token_expired"
                    break
                try:
                    async with asyncio.timeout(min(self.heartbeat, left)):
                        seq, data, pushed = await feed.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    feed.sent.clear()  # replay duplicates arrive right after the replay
                    continue
                if feed.ended is not None:
                    if data:
                        await response.write(data)  # the `closed` event of an evicted stream
                    reason = feed.ended
                    break
                if feed.overflowed:
                    reason = "slow_client"
                    break
                if seq and seq in feed.sent:
                    continue  # the replay wrote it
                await response.write(data)
                if pushed:
                    self.metrics.inbox_messages(pushed)
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            if reason == "client_closed" and self.hub.stopping:
                reason = "server_stopping"  # cancelled by the shutdown
            self.metrics.inbox_stream_closed(reason)
        return response


def inbox_routes(
    secret: bytes | None,
    dsn: str,
    pool: PoolFn,
    *,
    max_lifetime: int,
    audience: str | None,
    cors_origins: Sequence[str],
    connect_timeout: float = 10.0,
    max_streams: int = MAX_STREAMS,
    max_streams_per_user: int = MAX_STREAMS_PER_USER,
    metrics: InboxMetrics | None = None,
) -> Callable[[web.Application], None]:
    """The route adder for make_app: the inbox API and its feed, or nothing while no token
    secret is set (the paths answer 404)."""
    if not secret:
        return lambda _app: None
    api = InboxApi(
        secret,
        pool,
        FeedHub(
            dsn,
            connect_timeout=connect_timeout,
            max_streams=max_streams,
            max_streams_per_user=max_streams_per_user,
        ),
        max_lifetime=max_lifetime,
        audience=audience,
        cors_origins=cors_origins,
        metrics=metrics,
    )
    return api.routes
