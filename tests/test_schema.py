"""The schema and the SQL API, against a real PostgreSQL: what a producer in any language sees."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import asyncpg
import pytest

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import migrate, queries
from pgnotify_worker.errors import SchemaVersionError

# --- migrations -------------------------------------------------------------------------------


async def test_migrations_apply_from_zero_and_record_themselves(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await migrate.applied_version(conn) == 0
        with pytest.raises(SchemaVersionError, match="run `pgnotify-worker migrate`"):
            await migrate.check_version(conn)
        applied = await migrate.migrate(conn)
        assert applied == list(range(1, SCHEMA_VERSION + 1))
        assert await migrate.check_version(conn) == SCHEMA_VERSION
        assert await migrate.migrate(conn) == []  # nothing left to do
        first = await conn.fetchrow(
            "SELECT version, name FROM pgnotify.schema_migrations ORDER BY 1"
        )
        assert (first["version"], first["name"]) == (1, "core")
    finally:
        await conn.close()


async def test_three_replicas_migrating_at_once_is_safe(empty_dsn: str) -> None:
    conns = [await asyncpg.connect(empty_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        # replicas may share the work, but each version is applied by exactly one of them
        assert sorted(v for r in results for v in r) == list(range(1, SCHEMA_VERSION + 1))
        count = await conns[0].fetchval("SELECT count(*) FROM pgnotify.schema_migrations")
        assert count == SCHEMA_VERSION
    finally:
        for c in conns:
            await c.close()


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql not installed")
async def test_schema_files_apply_with_psql_and_rerun_as_no_ops(empty_dsn: str) -> None:
    files = sorted(migrate.schema_dir().glob("*.sql"))
    for _ in range(2):  # the second run must change nothing and fail nothing
        for path in files:
            result = subprocess.run(
                ["psql", empty_dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await migrate.applied_version(conn) == SCHEMA_VERSION
        assert (
            await conn.fetchval(
                "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x')"
            )
            == 1
        )
    finally:
        await conn.close()


async def test_every_runtime_query_prepares(conn: asyncpg.Connection) -> None:
    for name, sql in queries.ALL.items():
        try:
            await conn.prepare(sql)
        except asyncpg.PostgresError as exc:  # pragma: no cover - the assertion says which
            pytest.fail(f"query {name} does not prepare: {exc}")


# --- enqueue ------------------------------------------------------------------------------------


async def test_plain_insert_is_enough(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, payload) "
        "VALUES ('email', 'ada@example.com', 'Hi', 'Hi {{ name }}', '{\"name\": \"Ada\"}') RETURNING id"
    )
    row = await conn.fetchrow("SELECT * FROM pgnotify.notifications WHERE id = $1", nid)
    assert row["status"] == "queued"
    assert row["attempts"] == 0
    assert row["max_attempts"] == 10
    assert row["priority"] == 0
    assert row["payload"] == {"name": "Ada"}
    assert (
        row["run_at"] <= row["created_at"]
        or (row["run_at"] - row["created_at"]).total_seconds() < 1
    )


async def test_enqueue_with_named_arguments_and_defaults(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => 'https://example.com/hook', "
        "payload => '{\"order\": 7}', category => 'order.shipped', priority => 5)"
    )
    row = await conn.fetchrow("SELECT * FROM pgnotify.notifications WHERE id = $1", nid)
    assert (row["channel"], row["category"], row["priority"], row["status"]) == (
        "webhook",
        "order.shipped",
        5,
        "queued",
    )


async def test_enqueue_in_the_future_is_scheduled(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'soon', run_at => now() + interval '1 hour')"
    )
    assert (
        await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", nid)
        == "scheduled"
    )


async def test_inapp_recipient_defaults_to_user_id(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('inapp', user_id => 'user-42', body => 'hello')"
    )
    assert (
        await conn.fetchval("SELECT recipient FROM pgnotify.notifications WHERE id = $1", nid)
        == "user-42"
    )


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql not installed")
async def test_enqueue_from_a_shell_with_psql(dsn: str, conn: asyncpg.Connection) -> None:
    result = subprocess.run(
        [
            "psql",
            dsn,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "SELECT pgnotify.enqueue(channel => 'email', recipient => 'ada@example.com', "
            "subject => 'Hi', body => 'Hello {{ name }}', payload => '{\"name\": \"Ada\"}')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    nid = int(result.stdout.strip())
    assert await conn.fetchval(
        "SELECT recipient FROM pgnotify.notifications WHERE id = $1", nid
    ) == ("ada@example.com")


async def test_idempotency_key_returns_the_existing_row(conn: asyncpg.Connection) -> None:
    sql = "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x', idempotency_key => 'order-7-shipped')"
    first = await conn.fetchval(sql)
    second = await conn.fetchval(sql)
    assert first == second
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 1


async def test_concurrent_enqueues_with_one_key_make_one_row(
    dsn: str, conn: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=20, max_size=20)
    try:

        async def one() -> int:
            async with pool.acquire() as c, c.transaction():
                value: int = await c.fetchval(
                    "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x', idempotency_key => 'K')"
                )
                return value

        ids = await asyncio.gather(*(one() for _ in range(100)))
    finally:
        await pool.close()
    assert len(set(ids)) == 1
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 1


async def test_insert_notifies_once_per_statement_and_channel(
    dsn: str, conn: asyncpg.Connection
) -> None:
    listener = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgnotify", lambda *args: got.put_nowait(args[3]))
    try:
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, subject, body) "
            "SELECT 'email', 'u' || g || '@example.com', 'Hi', 'x' FROM generate_series(1, 500) g"
        )
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, body, run_at) "
            "VALUES ('sms', '+14155550123', 'later', now() + interval '1 day')"
        )
        payloads = [await asyncio.wait_for(got.get(), 5) for _ in range(2)]
        await conn.execute("SELECT 1")  # any further NOTIFY would arrive before this round trip
        await listener.execute("SELECT 1")
        assert payloads == ["email", "scheduled"]
        assert got.empty()
    finally:
        await listener.close()


# --- cancel and retry ---------------------------------------------------------------------------


async def test_cancel_only_what_has_not_started(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x')"
    )
    assert await conn.fetchval("SELECT pgnotify.cancel($1)", nid) is True
    assert await conn.fetchval("SELECT pgnotify.cancel($1)", nid) is False  # already cancelled
    assert await conn.fetchval("SELECT pgnotify.cancel(999999)") is False
    row = await conn.fetchrow("SELECT status FROM pgnotify.notifications WHERE id = $1", nid)
    assert row["status"] == "cancelled"
    events = await conn.fetch("SELECT event FROM pgnotify.events WHERE notification_id = $1", nid)
    assert [e["event"] for e in events] == ["cancelled"]


async def test_retry_requeues_failed_and_dead_only(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x')"
    )
    assert await conn.fetchval("SELECT pgnotify.retry($1)", nid) is False  # still queued
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'dead', attempts = 10, last_error = 'boom' WHERE id = $1",
        nid,
    )
    assert await conn.fetchval("SELECT pgnotify.retry($1)", nid) is True
    row = await conn.fetchrow(
        "SELECT status, attempts, last_error FROM pgnotify.notifications WHERE id = $1", nid
    )
    assert (row["status"], row["attempts"], row["last_error"]) == ("queued", 0, "boom")


# --- bad input: clear errors at INSERT, nothing stored -------------------------------------------

BAD_INPUT = [
    ("channel => 'fax', recipient => 'x', body => 'y'", "channel", "unknown channel 'fax'"),
    (
        "channel => 'email', recipient => 'not-an-address', body => 'y'",
        "recipient",
        "not a valid email",
    ),
    (
        "channel => 'email', recipient => 'Ada <ada@example.com>', body => 'y'",
        "recipient",
        "not a valid email",
    ),
    ("channel => 'email', body => 'y'", "recipient", "recipient is required"),
    (
        "channel => 'email', recipient => E'a@b.co\\r\\nBcc: x@evil.com', body => 'y'",
        "recipient",
        "control",
    ),
    (
        "channel => 'sms', recipient => 'call me', body => 'y'",
        "recipient",
        "not a valid phone number",
    ),
    ("channel => 'sms', recipient => '+1', body => 'y'", "recipient", "not a valid phone number"),
    ("channel => 'push', recipient => 'has space', body => 'y'", "recipient", "device token"),
    (
        "channel => 'webhook', recipient => 'ftp://example.com/x'",
        "recipient",
        "not a valid http(s) URL",
    ),
    (
        "channel => 'webhook', recipient => 'http://169.254.169.254/latest/meta-data'",
        "recipient",
        "metadata",
    ),
    (
        "channel => 'webhook', recipient => 'https://user:pw@example.com/'",
        "recipient",
        "credentials",
    ),
    ("channel => 'email', recipient => 'a@b.co'", "template", "needs a template or a body"),
    (
        "channel => 'email', recipient => 'a@b.co', template => 'nope'",
        "template",
        "unknown template 'nope'",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', payload => '[1,2]'",
        "payload",
        "JSON object",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', body => 'y', subject => E'Hi\\nBcc: x'",
        "subject",
        "line breaks",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', locale => 'english!'",
        "locale",
        "language tag",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', max_attempts => 0",
        "max_attempts",
        "between 1",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', priority => 100000",
        "priority",
        "between",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', run_at => 'infinity'",
        "run_at",
        "finite",
    ),
    (
        "channel => 'email', recipient => 'a@b.co', subject => 'Hi', body => 'y', idempotency_key => ''",
        "idempotency_key",
        "1 to 255",
    ),
]


@pytest.mark.parametrize(("args", "column", "message"), BAD_INPUT)
async def test_bad_input_is_rejected_with_a_message_naming_the_field(
    conn: asyncpg.Connection, args: str, column: str, message: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.fetchval(f"SELECT pgnotify.enqueue({args})")
    assert message in str(caught.value)
    assert caught.value.column_name == column
    assert str(caught.value).startswith("pgnotify: ")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0


async def test_a_one_megabyte_payload_is_refused_with_its_size(conn: asyncpg.Connection) -> None:
    big = {"blob": "x" * 1_000_000}  # the connection's codec encodes it
    with pytest.raises(
        asyncpg.CheckViolationError, match=r"payload is \d+ bytes, over the 262144 byte limit"
    ):
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'y', payload => $1::jsonb)",
            big,
        )
    # the limit is a setting an operator can raise per database or session
    await conn.execute("SET pgnotify.max_payload_bytes = 2000000")
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'y', payload => $1::jsonb)",
        big,
    )
    assert nid is not None


async def test_nul_bytes_and_lone_surrogates_are_refused_by_postgres(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.UntranslatableCharacterError, match=r"\\u0000 cannot be converted"):
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, body, payload) "
            "VALUES ('email', 'a@b.co', 'x', '{\"a\": \"\\u0000\"}')"
        )
    with pytest.raises(asyncpg.CharacterNotInRepertoireError):
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => $1)", "nul\x00byte"
        )
    with pytest.raises(asyncpg.InvalidTextRepresentationError, match="surrogate"):
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, body, payload) "
            "VALUES ('email', 'a@b.co', 'x', '{\"a\": \"\\ud800\"}')"
        )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0


async def test_status_cannot_be_forged_on_insert(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="status must be queued"):
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, body, status) VALUES ('email', 'a@b.co', 'x', 'sent')"
        )


# --- views --------------------------------------------------------------------------------------


async def test_queue_status_counts_each_state(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        INSERT INTO pgnotify.notifications (channel, recipient, subject, body, run_at)
        SELECT 'email', 'a@b.co', 'Hi', 'x', CASE WHEN g <= 3 THEN now() ELSE now() + interval '1 hour' END
        FROM generate_series(1, 5) g
        """
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET attempts = 1 WHERE id = (SELECT max(id) FROM pgnotify.notifications)"
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'dead', last_error = 'x' WHERE id = (SELECT min(id) FROM pgnotify.notifications)"
    )
    rows = {r["channel"]: r for r in await conn.fetch("SELECT * FROM pgnotify.queue_status")}
    assert set(rows) == {"email", "sms", "push", "webhook", "inapp"}
    email = rows["email"]
    assert (
        email["ready"],
        email["scheduled"],
        email["retrying"],
        email["dead"],
        email["processing"],
    ) == (
        2,
        1,
        1,
        1,
        0,
    )
    assert email["oldest_ready_seconds"] >= 0
    assert rows["sms"]["ready"] == 0


async def test_error_summary_groups_errors(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval("SELECT pgnotify.enqueue('webhook', 'https://example.com/h')")
    await conn.execute(
        """
        INSERT INTO pgnotify.events (notification_id, event, attempt, provider, error_code, error)
        VALUES ($1, 'retry_scheduled', 1, 'webhook', 'http_503', 'webhook example.com answered HTTP 503'),
               ($1, 'retry_scheduled', 2, 'webhook', 'http_503', 'webhook example.com answered HTTP 503'),
               ($1, 'dead', 3, 'webhook', 'http_503', 'webhook example.com answered HTTP 503')
        """,
        nid,
    )
    rows = await conn.fetch("SELECT * FROM pgnotify.error_summary")
    assert len(rows) == 1
    assert (rows[0]["occurrences"], rows[0]["notifications"], rows[0]["dead"]) == (3, 1, 1)


async def test_the_status_enum_is_the_database_check_constraint(conn: asyncpg.Connection) -> None:
    from pgnotify_worker.core.state import Status

    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'notifications_status_is_known'"
    )
    import re

    assert set(re.findall(r"'([a-z_]+)'::text", definition)) == {s.value for s in Status}
