"""A million-row backlog: the claim stays an index scan that reads only the rows it takes, and the
queries behind /status and the queue gauges never read the finished history (their plans and
time are checked on a table built with generate_series, as ANALYZE sees it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from pgnotify_worker.adapters import queries

READY = 1_000_000
FINISHED = 1_500_000  # more history than backlog, as a queue that has run for a while


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def explain(
    conn: asyncpg.Connection, sql: str, *args: object, analyze: bool = False
) -> list[dict[str, Any]]:
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    raw = await conn.fetchval(f"EXPLAIN ({options}) {sql}", *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return list(nodes(doc[0]["Plan"]))


CLAIM_FUNCTION = "pgnotify.claim(text, integer, text, double precision, timestamptz)"
CLAIM_ARGUMENTS = {  # the function's parameters, as the statement PL/pgSQL prepares sees them
    "p_channel": "$1::text",
    "p_limit": "$2::integer",
    "p_worker": "$3::text",
    "p_lease_seconds": "$4::float8",
    "p_since": "$5::timestamptz",
}


async def claim_statement(conn: asyncpg.Connection) -> str:
    """The query pgnotify.claim() runs (schema 0023), with its parameters as $n: what the worker's
    claim executes, to explain it. The function is planned for each call (schema 0028), checked
    too."""
    source, config = await conn.fetchrow(
        "SELECT prosrc, proconfig FROM pg_proc WHERE oid = $1::regprocedure", CLAIM_FUNCTION
    )
    assert "plan_cache_mode=force_custom_plan" in config
    body = source.split("RETURN QUERY", 1)[1].rsplit(";", 1)[0]
    for name in sorted(CLAIM_ARGUMENTS, key=len, reverse=True):
        body = body.replace(name, CLAIM_ARGUMENTS[name])
    return body


def seq_scans_of_notifications(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        n
        for n in plan
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "notifications"
    ]


@pytest.fixture
async def big(conn: asyncpg.Connection) -> asyncpg.Connection:
    """1M ready webhook rows and 1.5M sent ones (triggers off: this is about plans, not input)."""
    await conn.execute(
        f"""
        SET session_replication_role = replica;
        INSERT INTO pgnotify.notifications
            (channel, recipient, payload, priority, status, max_attempts, run_at, attempts,
             sent_at, updated_at)
        SELECT 'webhook', 'https://example.com/hook', '{{}}', 0, 'sent', 5,
               now() - interval '1 day', 1, now(), now() - interval '1 day'
        FROM generate_series(1, {FINISHED});
        INSERT INTO pgnotify.notifications
            (channel, recipient, payload, priority, status, max_attempts, run_at)
        SELECT 'webhook', 'https://example.com/hook', '{{}}', (g % 3)::smallint, 'queued', 5,
               now() - make_interval(secs => g % 600)
        FROM generate_series(1, {READY}) g;
        INSERT INTO pgnotify.notifications
            (channel, recipient, payload, priority, status, max_attempts, run_at)
        SELECT 'email', 'a@example.com', '{{}}', 0, 'queued', 5, now()
        FROM generate_series(1, 1000);
        RESET session_replication_role;
        """
    )
    # as autovacuum leaves it (the table's scale factor is 0.02): the visibility map set
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    return conn


@pytest.mark.timeout(600)
async def test_a_million_ready_rows_claim_by_index_and_count_without_history(
    big: asyncpg.Connection,
) -> None:
    args = ("webhook", 50, "w1", 30.0, None)
    claim = await claim_statement(big)
    plan = await explain(big, claim, *args)
    assert not seq_scans_of_notifications(plan), plan
    scans = [
        n for n in plan if n.get("Relation Name") == "notifications" and "Index" in n["Node Type"]
    ]
    assert any(n.get("Index Name") == "notifications_ready_idx" for n in scans), plan
    # the plan the function makes for each call (its parameters known)
    await big.execute("SET plan_cache_mode = force_custom_plan")
    custom = await explain(big, claim, *args)
    await big.execute("RESET plan_cache_mode")
    assert not seq_scans_of_notifications(custom), custom
    # and run for real (then rolled back): the ready index yields about the batch, not the backlog
    tx = big.transaction()
    await tx.start()
    try:
        ran = await explain(big, claim, *args, analyze=True)
    finally:
        await tx.rollback()
    ready_scan = [n for n in ran if n.get("Index Name") == "notifications_ready_idx"]
    assert ready_scan and all(n["Actual Rows"] <= 60 for n in ready_scan), ready_scan
    # the email channel's claim skips the million webhook rows
    email = await explain(big, claim, "email", 50, "w1", 30.0, None)
    assert not seq_scans_of_notifications(email)

    # /status and the queue gauges (one table built for both checks: it takes a while)
    plan = await explain(big, queries.NEXT_DUE)
    assert not seq_scans_of_notifications(plan)
    # queue_status reads each status through its partial index, and sendable_backlog counts the
    # ready rows. Counting a backlog that is 40 % of the table, the planner may rather read the
    # table than a million index entries (the costs are close at this size, ~0.1-0.4 s either
    # way); with history far larger than the backlog it never does. What must never happen is a
    # scan for any other status.
    for sql in (queries.QUEUE_STATUS, "SELECT * FROM pgnotify.sendable_backlog"):
        plan = await explain(big, sql)
        filters = [n.get("Filter", "") for n in seq_scans_of_notifications(plan)]
        assert all("(status = 'queued'::text)" in f for f in filters), (sql, filters)
    started = time.monotonic()
    rows = {r["channel"]: r for r in await big.fetch(queries.QUEUE_STATUS)}
    elapsed = time.monotonic() - started
    assert rows["webhook"]["ready"] == READY and rows["email"]["ready"] == 1000
    assert rows["webhook"]["oldest_ready_seconds"] >= 590
    # It counts the ready rows through their index (~0.1 s per million here); far from the
    # five seconds /status allows it, however many finished rows the table holds.
    assert elapsed < 3.0, elapsed


async def test_the_claims_plan_never_reads_the_whole_table_of_a_small_queue(
    conn: asyncpg.Connection,
) -> None:
    # The claim before 0023 joined its batch to the table, and at this size its generic plan
    # hashed a sequential scan of every row for each claim; through the primary key it is two
    # index scans at any size, generic or made for the call (0028).
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', 'https://example.com/hook', '{}' FROM generate_series(1, 20000)"
    )
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    claim = await claim_statement(conn)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    plan = await explain(conn, claim, "webhook", 25, "w1", 30.0, None)
    assert not seq_scans_of_notifications(plan), plan
    assert {"notifications_ready_idx", "notifications_pkey"} <= {n.get("Index Name") for n in plan}
    await conn.execute("RESET plan_cache_mode")
    # and the worker's statement claims through it: 25 rows, in claim order, leased
    rows = await conn.fetch(queries.CLAIM, "webhook", 25, "w1", 30.0, None)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 25
    leased = await conn.fetchval(
        "SELECT count(*) FROM pgnotify.notifications WHERE status = 'processing' "
        "AND locked_by = 'w1' AND locked_until > now() AND attempts = 1"
    )
    assert leased == 25


async def test_a_claim_first_run_on_an_empty_table_does_not_keep_its_plan(
    conn: asyncpg.Connection, dsn: str
) -> None:
    """A worker's first claim runs at start-up, often on an empty table (a new installation, a
    table emptied by retention). With the plan kept for the session (0023) every later claim of
    that session read the whole table: a sequential scan and a sort of every row per claim. The
    plan of each call is made for the table as it is (0028)."""
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")  # empty, and known to be
    worker = await asyncpg.connect(dsn)  # one session, as a pooled connection of the worker
    try:
        assert await worker.fetch(queries.CLAIM, "webhook", 25, "w1", 30.0, None) == []
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "SELECT 'webhook', 'https://example.com/hook', '{}' FROM generate_series(1, 20000)"
        )
        # no ANALYZE since: autovacuum has not come by yet. The claim's own statement, as
        # executed, through auto_explain (nested statements, logged to this client).
        plans: list[str] = []
        worker.add_log_listener(lambda _c, message: plans.append(str(message)))
        await worker.execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
            "SET auto_explain.log_nested_statements = on; SET client_min_messages = log"
        )
        rows = await worker.fetch(queries.CLAIM, "webhook", 25, "w1", 30.0, None)
        await worker.execute("SET client_min_messages = notice")
    finally:
        await worker.close()
    assert len(rows) == 25
    claim = [p for p in plans if "WITH ready AS" in p]
    assert claim, plans
    assert "Seq Scan on notifications" not in claim[0], claim[0]
    assert "notifications_ready_idx" in claim[0] and "notifications_pkey" in claim[0], claim[0]


async def test_the_write_back_reads_its_rows_through_the_primary_key_whatever_the_statistics(
    conn: asyncpg.Connection,
) -> None:
    """Statistics are taken when few rows are processing (the state lasts seconds), so the
    planner believes "this worker's processing rows" are about one. Written plainly, the
    write-back, the heartbeat and the release started from them and hashed or looped over every
    processing row: with 21,000 rows in flight under set-based in-app delivery, 10 million
    comparisons and 3 s per write-back of 500, 1.4 s per heartbeat of 2,000. They start from the
    batch and read each row through the primary key (queries.py, LEASED)."""
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', 'https://example.com/hook', '{}' FROM generate_series(1, 40000)"
    )
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")  # nothing processing
    claimed = await conn.fetch(queries.CLAIM, "webhook", 20000, "w1", 300.0, None)
    ids = [r["id"] for r in claimed][:500]
    attempts = [1] * len(ids)
    n = len(ids)
    statements = {
        "COMPLETE": (
            queries.COMPLETE,
            (
                "w1",
                ids,
                attempts,
                ["sent"] * n,
                ["sent"] * n,
                [0.0] * n,
                [None] * n,
                [None] * n,
                ["webhook"] * n,
                [None] * n,
                [1.0] * n,
                [None] * n,
                [0] * n,
                [None] * n,
                [None] * n,
            ),
        ),
        "HEARTBEAT": (queries.HEARTBEAT, ("w1", ids, attempts, 30.0)),
        "RELEASE": (queries.RELEASE, ("w1", ids, attempts)),
    }
    for name, (sql, args) in statements.items():
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            plan = await explain(conn, sql, *args)
            scans = [
                n
                for n in plan
                if n.get("Relation Name") == "notifications" and "Scan" in n["Node Type"]
            ]
            assert scans and all(n.get("Index Name") == "notifications_pkey" for n in scans), (
                name,
                mode,
                [(n["Node Type"], n.get("Index Name")) for n in scans],
            )
    await conn.execute("RESET plan_cache_mode")
    # and the fences hold: a row no longer processing, or leased by another worker, is neither
    # renewed nor written
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'queued', locked_by = NULL, "
        "locked_until = NULL WHERE id = $1",
        ids[0],
    )
    await conn.execute(  # another worker's lease: not ours to write either
        "UPDATE pgnotify.notifications SET locked_by = 'w2' WHERE id = $1", ids[1]
    )
    renewed = await conn.fetch(queries.HEARTBEAT, "w1", ids, attempts, 30.0)
    assert sorted(r["id"] for r in renewed) == sorted(ids[2:])
    written = await conn.fetch(queries.COMPLETE, *statements["COMPLETE"][1])
    assert sorted(r["id"] for r in written) == sorted(ids[2:])
