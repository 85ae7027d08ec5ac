"""The inbox HTTP API's contract (docs/inbox.md): tokens, pages, filters, marks, counts, CORS,
and that one user's token never reaches another user's rows."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from pgnotify_worker.core import app_tokens
from tests.support import inbox
from tests.support.inbox import Served

ORIGIN = "https://app.example.com"
T = TypeVar("T")


@pytest.fixture
async def api(dsn: str, conn: asyncpg.Connection) -> AsyncIterator[Served]:
    await inbox.prepare(conn)
    async with inbox.serve(dsn, cors_origins=[ORIGIN]) as served:
        yield served


async def get(api: Served, path: str, user: str = "ada", **params: str) -> tuple[int, Any]:
    async with api.http.get(api.url + path, params=params, headers=api.auth(user)) as r:
        return r.status, await r.json()


async def post(api: Served, path: str, body: object, user: str = "ada") -> tuple[int, Any]:
    async with api.http.post(api.url + path, json=body, headers=api.auth(user)) as r:
        return r.status, await r.json()


# --- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "send the user token as Authorization: Bearer <token>"),
        ("Basic abc", "send the user token as Authorization: Bearer <token>"),
        ("Bearer not.a.jwt", "token is not a compact JWT"),
        ("Bearer " + app_tokens.issue(b"wrong-secret", "ada", int(time.time())), "signature"),
        ("Bearer " + app_tokens.issue(inbox.SECRET, "ada", int(time.time()) - 3600), "expired"),
        (
            "Bearer " + app_tokens.issue(inbox.SECRET, "ada", int(time.time()), 10 * 86_400),
            "lives longer",
        ),
    ],
)
async def test_a_bad_token_gets_401_with_a_challenge_and_the_reason(
    api: Served, header: str | None, reason: str
) -> None:
    headers = {"Authorization": header} if header else {}
    for path in ("/inbox/messages", "/inbox/counts", "/inbox/stream"):
        async with api.http.get(api.url + path, headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith('Bearer realm="pgnotify inbox"')
            assert reason in (await r.json())["error"]
            assert "not.a.jwt" not in r.headers["WWW-Authenticate"]  # never echoed


async def test_query_token_is_accepted_on_the_stream_only(api: Served) -> None:
    token = api.token("ada")
    async with api.http.get(api.url + "/inbox/messages", params={"token": token}) as r:
        assert r.status == 401
    async with api.http.get(api.url + "/inbox/stream", params={"token": token}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")


async def test_no_secret_means_no_inbox_routes() -> None:
    from aiohttp import web

    from pgnotify_worker.adapters.inbox_http import inbox_routes

    app = web.Application()
    inbox_routes(
        None, "postgresql://unused", lambda: None, max_lifetime=60, audience=None, cors_origins=()
    )(app)
    assert not [r for r in app.router.routes() if r.resource and "inbox" in str(r.resource)]


# --- pages -----------------------------------------------------------------------------------


async def test_pages_are_newest_first_and_the_cursor_walks_to_the_end(
    api: Served, conn: asyncpg.Connection
) -> None:
    ids = await inbox.add(conn, "ada", count=7)
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        status, body = await get(api, "/inbox/messages", **params)
        assert status == 200
        seen += [m["id"] for m in body["messages"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    assert pages == 3  # 3 + 3 + 1, and the last page says there is no next one
    first = (await get(api, "/inbox/messages", limit="1"))[1]["messages"][0]
    assert set(first) == {
        "id",
        "seq",
        "notification_id",
        "category",
        "title",
        "body",
        "data",
        "created_at",
        "read_at",
        "seen_at",
        "archived_at",
    }
    assert first["data"] == {"k": 1} and first["read_at"] is None


async def test_an_exact_last_page_has_no_cursor_and_an_empty_inbox_is_a_page(
    api: Served, conn: asyncpg.Connection
) -> None:
    status, body = await get(api, "/inbox/messages")
    assert (status, body) == (200, {"messages": [], "next_cursor": None})
    await inbox.add(conn, "ada", count=4)
    status, body = await get(api, "/inbox/messages", limit="2")
    status, body = await get(api, "/inbox/messages", limit="2", cursor=body["next_cursor"])
    assert len(body["messages"]) == 2 and body["next_cursor"] is None


async def test_rows_added_while_paging_neither_repeat_nor_shift_the_pages(
    api: Served, conn: asyncpg.Connection
) -> None:
    ids = await inbox.add(conn, "ada", count=4)
    _, first = await get(api, "/inbox/messages", limit="2")
    await inbox.add(conn, "ada", count=3)  # newer rows arrive meanwhile
    _, second = await get(api, "/inbox/messages", limit="2", cursor=first["next_cursor"])
    assert [m["id"] for m in second["messages"]] == sorted(ids, reverse=True)[2:]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"cursor": "nonsense!"}, "cursor is not one this API gave out"),
        ({"cursor": "aTA"}, "cursor is not one this API gave out"),  # "i0"
        ({"cursor": "eDEy"}, "cursor is not one this API gave out"),  # "x12"
        ({"limit": "0"}, "limit must be an integer from 1 to 100"),
        ({"limit": "101"}, "limit must be an integer from 1 to 100"),
        ({"limit": "ten"}, "limit must be an integer from 1 to 100"),
        ({"archived": "maybe"}, "archived must be false, true or any"),
        ({"sort": "asc"}, "unknown parameter(s): sort"),
    ],
)
async def test_bad_parameters_get_400_saying_which(
    api: Served, params: dict[str, str], reason: str
) -> None:
    status, body = await get(api, "/inbox/messages", **params)
    assert (status, body) == (400, {"error": reason})


async def test_filters_by_category_and_archived_state(
    api: Served, conn: asyncpg.Connection
) -> None:
    billing = await inbox.add(conn, "ada", category="billing", count=2)
    chat = await inbox.add(conn, "ada", category="chat", count=2)
    assert (await post(api, "/inbox/messages/archive", {"ids": [billing[0], chat[0]]}))[0] == 200

    async def ids(**params: str) -> list[int]:
        status, body = await get(api, "/inbox/messages", **params)
        assert status == 200
        return sorted(m["id"] for m in body["messages"])

    assert await ids() == sorted([billing[1], chat[1]])
    assert await ids(category="billing") == [billing[1]]
    assert await ids(archived="true") == sorted([billing[0], chat[0]])
    assert await ids(archived="true", category="chat") == [chat[0]]
    assert await ids(archived="any") == sorted(billing + chat)
    assert await ids(archived="any", category="billing") == billing
    assert await ids(category="nothing-here") == []


# --- marks and counts ------------------------------------------------------------------------


async def test_marks_one_several_and_all_and_the_counts_follow(
    api: Served, conn: asyncpg.Connection
) -> None:
    a, b, c, d = await inbox.add(conn, "ada", count=4)
    assert await get(api, "/inbox/counts") == (200, {"total": 4, "unread": 4, "unseen": 4})

    assert await post(api, "/inbox/messages/read", {"ids": [a]}) == (
        200,
        {"changed": 1, "counts": {"total": 4, "unread": 3, "unseen": 4}},
    )
    # again: nothing changes, and the counts stay right
    assert (await post(api, "/inbox/messages/read", {"ids": [a, b]}))[1]["changed"] == 1
    assert (await post(api, "/inbox/messages/seen", {"all": True}))[1] == {
        "changed": 4,
        "counts": {"total": 4, "unread": 2, "unseen": 0},
    }
    assert (await post(api, "/inbox/messages/archive", {"ids": [c]}))[1]["counts"] == {
        "total": 4,
        "unread": 1,
        "unseen": 0,
    }
    assert (await post(api, "/inbox/messages/unread", {"ids": [a]}))[1]["counts"]["unread"] == 2
    assert (await post(api, "/inbox/messages/read", {"all": True}))[1] == {
        "changed": 2,
        "counts": {"total": 4, "unread": 0, "unseen": 0},
    }
    assert (await post(api, "/inbox/messages/unarchive", {"ids": [c]}))[1]["counts"] == {
        "total": 4,
        "unread": 1,
        "unseen": 0,  # c was never read
    }
    assert (await post(api, "/inbox/messages/archive", {"all": True}))[1]["changed"] == 4
    assert await get(api, "/inbox/counts") == (200, {"total": 4, "unread": 0, "unseen": 0})
    row = await conn.fetchrow(
        "SELECT read_at, seen_at, archived_at FROM pgnotify.inbox WHERE id = $1", d
    )
    assert all(row[k] is not None for k in ("read_at", "seen_at", "archived_at"))
    # counts stay exact when rows go (retention, erasure)
    await conn.execute("DELETE FROM pgnotify.inbox WHERE id = ANY ($1::bigint[])", [a, b])
    assert await get(api, "/inbox/counts") == (200, {"total": 2, "unread": 0, "unseen": 0})
    await conn.execute("DELETE FROM pgnotify.inbox WHERE user_id = 'ada'")
    assert await get(api, "/inbox/counts") == (200, {"total": 0, "unread": 0, "unseen": 0})
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox_counts") == 0  # no trace


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("read", {}, 400, "body must be"),
        ("read", {"ids": []}, 400, "body must be"),
        ("read", {"ids": ["1"]}, 400, "body must be"),
        ("read", {"ids": [True]}, 400, "body must be"),
        ("read", {"ids": [-1]}, 400, "body must be"),
        ("read", {"ids": list(range(1, 1002))}, 400, "body must be"),
        ("read", {"ids": [1], "all": True}, 400, "body must be"),
        ("read", {"all": False}, 400, "body must be"),
        ("read", [1, 2], 400, "body must be"),
        ("unread", {"all": True}, 400, "this action takes ids only"),
        ("delete", {"ids": [1]}, 404, "no such action"),
    ],
)
async def test_bad_mark_bodies_get_a_clear_error_and_change_nothing(
    api: Served, conn: asyncpg.Connection, path: str, body: object, status: int, reason: str
) -> None:
    await inbox.add(conn, "ada", count=2)
    got, answer = await post(api, f"/inbox/messages/{path}", body)
    assert got == status and reason in answer["error"]
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox WHERE read_at IS NULL") == 2


async def test_a_mark_needs_a_json_body(api: Served) -> None:
    async with api.http.post(
        api.url + "/inbox/messages/read", data="ids=1", headers=api.auth("ada")
    ) as r:
        assert r.status == 400
        assert "JSON body" in (await r.json())["error"]


# --- isolation -------------------------------------------------------------------------------


async def test_a_token_for_one_user_never_reads_or_changes_another_users_rows(
    api: Served, conn: asyncpg.Connection
) -> None:
    ada = await inbox.add(conn, "ada", "for ada", count=2)
    bob = await inbox.add(conn, "bob", "for bob", count=2)
    _, page = await get(api, "/inbox/messages", user="bob", archived="any")
    assert sorted(m["id"] for m in page["messages"]) == bob
    # ada's ids, marked with bob's token: nothing happens to them
    for action in ("read", "seen", "archive"):
        assert (await post(api, f"/inbox/messages/{action}", {"ids": ada}, user="bob"))[1][
            "changed"
        ] == 0
    assert (await post(api, "/inbox/messages/read", {"all": True}, user="bob"))[1]["changed"] == 2
    untouched = await conn.fetch(
        "SELECT read_at, seen_at, archived_at FROM pgnotify.inbox WHERE user_id = 'ada'"
    )
    assert all(tuple(r) == (None, None, None) for r in untouched)
    assert await get(api, "/inbox/counts", user="ada") == (
        200,
        {"total": 2, "unread": 2, "unseen": 2},
    )
    # a cursor made from ada's page does not show bob ada's rows either
    _, first = await get(api, "/inbox/messages", user="ada", limit="1")
    _, rest = await get(api, "/inbox/messages", user="bob", cursor=first["next_cursor"])
    assert all(m["title"] == "for bob" for m in rest["messages"])


# --- CORS ------------------------------------------------------------------------------------


async def test_cors_allows_the_configured_origin_only_never_a_wildcard(api: Served) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with api.http.options(api.url + "/inbox/messages", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "Origin" in r.headers["Vary"]
    evil = {**preflight, "Origin": "https://evil.example"}
    async with api.http.options(api.url + "/inbox/messages", headers=evil) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    headers = {**api.auth("ada"), "Origin": ORIGIN}
    async with api.http.get(api.url + "/inbox/counts", headers=headers) as r:
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in r.headers["Vary"]
        assert r.headers.get("Access-Control-Allow-Credentials") is None
    async with api.http.get(
        api.url + "/inbox/counts", headers={**headers, "Origin": "https://evil.example"}
    ) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    # a refusal is readable by the page too (it can tell an expired token from a network error)
    async with api.http.get(api.url + "/inbox/counts", headers={"Origin": ORIGIN}) as r:
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with api.http.get(api.url + "/healthz", headers={"Origin": ORIGIN}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers  # only the inbox paths


# --- a million rows for one user -------------------------------------------------------------


@pytest.mark.slow
async def test_a_user_with_a_million_rows_gets_pages_counts_and_marks_fast(
    api: Served, conn: asyncpg.Connection
) -> None:
    await conn.execute("ALTER TABLE pgnotify.inbox DISABLE TRIGGER inbox_notify_rows")  # bulk load
    await conn.execute(
        """
        INSERT INTO pgnotify.inbox (notification_id, user_id, category, title, read_at,
                                    archived_at)
        SELECT g, 'whale', CASE WHEN g % 1000 = 1 THEN 'rare' ELSE 'chat' END, 'm' || g,
               CASE WHEN g % 2 = 0 THEN now() END, CASE WHEN g % 10 = 0 THEN now() END
        FROM generate_series(1, 1000000) AS g
        """
    )
    await conn.execute("ALTER TABLE pgnotify.inbox ENABLE TRIGGER inbox_notify_rows")
    await inbox.add(conn, "ada", count=3)
    await conn.execute("ANALYZE pgnotify.inbox")

    async def timed(path: str, user: str = "whale", **params: str) -> tuple[float, Any]:
        started = time.perf_counter()
        status, body = await get(api, path, user, **params)
        assert status == 200
        return time.perf_counter() - started, body

    took, counts = await timed("/inbox/counts")
    assert counts == {"total": 1_000_000, "unread": 500_000, "unseen": 900_000}
    assert took < 0.5
    took, first = await timed("/inbox/messages", limit="50")
    assert took < 0.5 and len(first["messages"]) == 50
    # deep in the feed: keyset, not OFFSET
    deep = app_tokens_cursor(200_000)
    for params in (
        {"cursor": deep},
        {"category": "rare"},
        {"category": "rare", "cursor": deep},
        {"archived": "true"},
        {"archived": "any", "cursor": deep},
    ):
        took, body = await timed("/inbox/messages", **params)
        assert took < 0.5, (params, took)
        assert body["messages"], params
    took, _ = await timed("/inbox/counts", user="ada")
    assert took < 0.5

    # the plans behind it: index scans bounded by the page, never a scan of the user's rows
    for sql, args in (
        ("INBOX_PAGE", ("whale", 2**63 - 1, 21)),
        ("INBOX_PAGE_CATEGORY", ("whale", 2**63 - 1, 21, "rare")),
        ("INBOX_PAGE_ARCHIVED", ("whale", 2**63 - 1, 21)),
        ("INBOX_COUNTS", ("whale",)),
        ("INBOX_SINCE", ("whale", 999_000, 501)),
    ):
        from pgnotify_worker.adapters import queries

        plan = "\n".join(
            r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + queries.ALL[sql], *args)
        )
        assert "Seq Scan" not in plan, (sql, plan)
        buffers = sum(int(x) for x in _numbers(plan, "shared hit="))
        assert buffers < 5000, (sql, plan)

    # marking one read touches one row; the count follows at once
    one = first["messages"][0]["id"]
    started = time.perf_counter()
    status, marked = await post(api, "/inbox/messages/read", {"ids": [one]}, user="whale")
    assert status == 200 and time.perf_counter() - started < 0.5
    assert marked["counts"]["unread"] == 499_999


def app_tokens_cursor(below: int) -> str:
    """The cursor the API would give for a page ending at id `below`."""
    from pgnotify_worker.adapters.inbox_http import encode_cursor

    return encode_cursor(below)


def _numbers(text: str, prefix: str) -> list[str]:
    import re

    return re.findall(re.escape(prefix) + r"([0-9]+)", text)


async def test_counts_stay_exact_under_concurrent_writers(
    api: Served, dsn: str, conn: asyncpg.Connection
) -> None:
    """The trigger-kept counts equal a count of the rows after inserts, marks and deletes
    racing on several connections for the same users.

    The writers' own multi-row UPDATEs of one user's rows can lock those rows in different
    orders (each statement sees the rows where its snapshot does), so PostgreSQL may abort one of
    them as a deadlock: an app-level hazard that an app meets with a retry, and so do these
    writers (each statement is its own transaction, so a retry repeats it whole). The counts'
    triggers are not part of such a cycle: they lock inbox_counts rows in user_id order, after
    the statement's row locks."""
    import asyncio

    retries: list[str] = []

    async def retried(
        what: str, statement: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Run one statement (its own transaction), again if a deadlock aborted it (5 tries)."""
        for attempt in range(1, 6):
            try:
                return await statement(*args, **kwargs)
            except asyncpg.DeadlockDetectedError:
                if attempt == 5:
                    raise
                retries.append(what)
        raise AssertionError("unreachable")

    async def writer(n: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            for round_ in range(10):
                user = f"u{round_ % 3}"
                ids = await retried("insert", inbox.add, c, user, f"w{n}", count=5)
                await retried(
                    "read",
                    c.execute,
                    "UPDATE pgnotify.inbox SET read_at = now() WHERE id = ANY ($1::bigint[])",
                    ids[:2],
                )
                await retried(
                    "seen+archive",
                    c.execute,
                    "UPDATE pgnotify.inbox SET seen_at = now(), archived_at = now() "
                    "WHERE user_id = $1 AND id % 7 = 0",
                    user,
                )
                await retried(
                    "delete", c.execute, "DELETE FROM pgnotify.inbox WHERE id = $1", ids[4]
                )
        finally:
            await c.close()

    await asyncio.gather(*(writer(n) for n in range(6)))
    expected = await conn.fetch(
        """
        SELECT user_id, count(*) AS total,
               count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL) AS unread,
               count(*) FILTER (WHERE seen_at IS NULL AND archived_at IS NULL) AS unseen
        FROM pgnotify.inbox GROUP BY user_id ORDER BY user_id
        """
    )
    kept = await conn.fetch(
        "SELECT user_id, total, unread, unseen FROM pgnotify.inbox_counts ORDER BY user_id"
    )
    assert [tuple(r) for r in kept] == [tuple(r) for r in expected], f"retries: {retries}"
    assert len(kept) == 3
    # every round of every writer landed (a retried statement counts once): 6 x 10 x (5 - 1)
    assert sum(r["total"] for r in kept) == 240, f"retries: {retries}"


async def test_two_tabs_changing_all_messages_at_once_never_deadlock(
    api: Served, dsn: str, conn: asyncpg.Connection
) -> None:
    """ "Mark all read" in one tab while another archives all or brings messages back: each
    statement locks the user's rows in id order first (queries._inbox_change), so they wait for
    each other; before, each locked them in the order of the index it read them through, and
    PostgreSQL aborted one of them as a deadlock (a 500 for that user)."""
    import asyncio
    import random

    from pgnotify_worker.adapters import queries

    ids = await inbox.add(conn, "tabs", "t", count=300)
    everything = [
        (queries.INBOX_READ_ALL, ()),
        (queries.INBOX_SEEN_ALL, ()),
        (queries.INBOX_ARCHIVE_ALL, ()),
        (queries.INBOX_UNARCHIVE, (ids,)),
        (queries.INBOX_UNREAD, (ids,)),
        (queries.INBOX_READ, (ids[::-1],)),
        (queries.INBOX_ARCHIVE, (ids[::2],)),
        ("SELECT pgnotify.inbox_mark_read($1)", ()),  # the SQL API beside it (schema 0029)
        ("SELECT pgnotify.inbox_mark_read($1, $2)", (ids[::-3],)),
    ]

    async def tab(seed: int) -> int:
        order = random.Random(seed)
        c = await asyncpg.connect(dsn)
        changed = 0
        try:
            for _ in range(30):
                sql, args = order.choice(everything)
                changed += await c.fetchval(sql, "tabs", *args)
        finally:
            await c.close()
        return changed

    async with asyncio.timeout(120):
        await asyncio.gather(*(tab(seed) for seed in range(4)))
    # and the trigger-kept counts still match the rows
    kept = await conn.fetchrow(
        "SELECT total, unread, unseen FROM pgnotify.inbox_counts WHERE user_id = 'tabs'"
    )
    counted = await conn.fetchrow(
        """SELECT count(*) AS total,
                  count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL) AS unread,
                  count(*) FILTER (WHERE seen_at IS NULL AND archived_at IS NULL) AS unseen
           FROM pgnotify.inbox WHERE user_id = 'tabs'"""
    )
    assert tuple(kept) == tuple(counted)


async def test_one_insert_of_many_rows_announces_each_new_row_in_order(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """The set-based in-app delivery writes a claimed batch in one INSERT: every row it added
    is announced (payload version 1), in id order; a row the INSERT skipped (already there) is
    not (schema 0030: one statement trigger instead of a row trigger)."""
    import asyncio
    import json

    live = await asyncpg.connect(dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await live.add_listener("pgnotify_inbox", lambda *a: heard.put_nowait(a[3]))
    try:
        first = await conn.fetchval(
            "INSERT INTO pgnotify.inbox (notification_id, user_id, title) "
            "VALUES (900, 'solo', 'one') RETURNING id"
        )
        # 900 is there already: skipped, not announced
        rows = await conn.fetch(
            """INSERT INTO pgnotify.inbox (notification_id, user_id, category, title)
               SELECT 900 + g, 'u' || (g % 2), 'c', 't' || g FROM generate_series(0, 5) g
               ON CONFLICT (notification_id) DO NOTHING
               RETURNING id, seq, user_id, notification_id"""
        )
        payloads = [json.loads(await asyncio.wait_for(heard.get(), 5)) for _ in range(6)]
    finally:
        await live.close()
    assert payloads[0]["id"] == first
    assert payloads[1:] == [
        {
            "v": 1,
            "event": "new",
            "id": r["id"],
            "seq": r["seq"],
            "user_id": r["user_id"],
            "notification_id": r["notification_id"],
        }
        for r in sorted(rows, key=lambda r: r["id"])
    ]
    assert len(rows) == 5 and heard.empty()
