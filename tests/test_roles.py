"""Migration 0006: least privilege. Real LOGIN roles (cluster-wide, so unique per test and dropped
after it) that are members of pgnotify_producer, pgnotify_worker or pgnotify_admin, or of
nothing, connect with asyncpg and do what their role allows, and nothing else."""

from __future__ import annotations

import secrets
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import migrate
from tests import conftest
from tests.support.db import wait_rows
from tests.support.roles import LoginAs
from tests.support.webhooks import WebhookSink
from tests.support.worker import running


async def denied(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
        await conn.execute(sql, *args)
    assert caught.value.sqlstate == "42501", sql


# Every function a producer must not run: the worker's and the admin's.
NOT_FOR_PRODUCERS = [
    "SELECT pgnotify.retry(1)",
    "SELECT pgnotify.requeue_expired_leases()",
    "SELECT pgnotify.build_digests('daily')",
    "SELECT pgnotify.preference_of('u', 'email', 'news')",
    "SELECT pgnotify.address_of('u', 'email')",
    "SELECT pgnotify.refresh_dashboard()",
    "SELECT pgnotify.apply_grants()",
    "CALL pgnotify.apply_retention()",
]

NOT_READABLE_BY_PRODUCERS = [
    "SELECT * FROM pgnotify.notifications",
    "SELECT id FROM pgnotify.notifications",
    "SELECT count(*) FROM pgnotify.notifications",
    "UPDATE pgnotify.notifications SET priority = 1",
    "DELETE FROM pgnotify.notifications",
    "SELECT * FROM pgnotify.events",
    "INSERT INTO pgnotify.events (notification_id, event) VALUES (1, 'sent')",
    "UPDATE pgnotify.events SET error = NULL",
    "DELETE FROM pgnotify.events",
    "SELECT * FROM pgnotify.queue_status",
    "SELECT * FROM pgnotify.failed_report",
    "SELECT body FROM pgnotify.templates",
    "INSERT INTO pgnotify.templates (key, channel, body) VALUES ('k', 'email', 'x')",
    "SELECT * FROM pgnotify.devices",
    "SELECT * FROM pgnotify.preferences",
    "SELECT * FROM pgnotify.suppressions",
    "SELECT * FROM pgnotify.jobs",
    # RETURNING needs SELECT: producers get their id from enqueue()
    "INSERT INTO pgnotify.notifications (channel, recipient, subject, body) "
    "VALUES ('email', 'a@example.com', 'Hi', 'x') RETURNING id",
    # the worker's columns are not a producer's to set
    "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, status) "
    "VALUES ('email', 'a@example.com', 'Hi', 'x', 'queued')",
    "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, provider) "
    "VALUES ('email', 'a@example.com', 'Hi', 'x', 'resend')",
]


async def test_a_producer_enqueues_and_can_read_nothing_back(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        # a plain INSERT, its triggers (validation, template lookup, expiry, NOTIFY) included
        await conn.execute(
            "INSERT INTO pgnotify.templates (key, channel, subject, body) "
            "VALUES ('welcome', 'email', 'Welcome', 'Hello')"
        )
        await producer.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, template, category, payload) "
            "VALUES ('email', 'ada@example.com', 'welcome', 'security', '{\"name\": \"Ada\"}')"
        )
        await producer.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient) "
            "VALUES ('webhook', 'https://example.com/hook')"
        )
        # enqueue() returns the id, and finds it again for the same idempotency key
        first = await producer.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x', "
            "idempotency_key => 'order-1')"
        )
        again = await producer.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x', "
            "idempotency_key => 'order-1')"
        )
        assert first == again and first is not None
        assert await producer.fetchval("SELECT pgnotify.cancel($1)", first) is True
        # the application keeps its users' contacts, devices, preferences and consents
        await producer.execute(
            "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('ada', 'ada@example.com')"
        )
        await producer.execute("SELECT pgnotify.register_device('ada', 'android', 'tok-1')")
        await producer.execute("SELECT pgnotify.set_preference('ada', 'off', 'push', 'billing')")
        await producer.execute("SELECT pgnotify.record_consent('ada', 'marketing', true, 'form')")
        ids = await producer.fetchval(
            "SELECT pgnotify.notify_user('ada', 'billing', subject => 'Invoice', body => 'x')"
        )
        assert len(ids) == 2  # email and in-app; push is off for billing
        # a chat message fans out through the (SECURITY DEFINER) chat trigger
        await producer.execute(
            "INSERT INTO pgnotify.chat_rooms (id, organization_id, name) VALUES ('r1', 'o1', 'Ops');"
            "INSERT INTO pgnotify.chat_room_members (room_id, user_id) "
            "VALUES ('r1', 'ada'), ('r1', 'bob')"
        )
        await producer.execute(
            "INSERT INTO pgnotify.chat_messages (room_id, author_id, body) VALUES ('r1', 'bob', 'hi')"
        )
        assert await producer.fetchval("SELECT pgnotify.inbox_mark_read('ada')") == 0
        # a validation error still names its field
        with pytest.raises(asyncpg.CheckViolationError, match="not a valid email"):
            await producer.execute("SELECT pgnotify.enqueue('email', 'nope', body => 'x')")

        for sql in NOT_READABLE_BY_PRODUCERS + NOT_FOR_PRODUCERS:
            await denied(producer, sql)
    finally:
        await producer.close()
    counts = await conn.fetchrow(
        "SELECT count(*) AS rows, count(*) FILTER (WHERE category = 'chat') AS chat "
        "FROM pgnotify.notifications"
    )
    assert (counts["rows"], counts["chat"]) == (8, 3)  # 2 + 1 + 2 + chat: in-app, push, email


async def test_the_worker_queries_are_not_a_producers_to_run(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    from pgnotify_worker.adapters import queries

    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        await denied(producer, queries.CLAIM, "email", 10, "w", 30.0, None)
        await denied(producer, queries.REAP, 10)
        await denied(producer, queries.PROMOTE, 10)
        await denied(producer, queries.NEXT_DUE)
        await denied(producer, queries.JOB_CLAIM)
    finally:
        await producer.close()


async def test_public_can_call_nothing(conn: asyncpg.Connection, login_as: LoginAs) -> None:
    nobody_dsn = await login_as()
    name = urlsplitted_user(nobody_dsn)
    # with USAGE on the schema, so that what stops it is the function's own ACL
    await conn.execute(f"GRANT USAGE ON SCHEMA pgnotify TO {name}")
    try:
        routines = await conn.fetch(
            "SELECT p.oid, p.oid::regprocedure::text AS signature, p.prokind, "
            "has_function_privilege($1, p.oid, 'EXECUTE') AS allowed, "
            "EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
            "        WHERE a.grantee = 0) AS public "
            "FROM pg_proc p WHERE p.pronamespace = 'pgnotify'::regnamespace",
            name,
        )
        assert len(routines) >= 30
        assert [r["signature"] for r in routines if r["allowed"] or r["public"]] == []
        nobody = await asyncpg.connect(nobody_dsn)
        try:
            await denied(nobody, "SELECT pgnotify.enqueue('email', 'a@example.com', body => 'x')")
            await denied(nobody, "SELECT pgnotify.notify_user('ada', 'billing', body => 'x')")
            await denied(nobody, "SELECT pgnotify.cancel(1)")
            for sql in NOT_FOR_PRODUCERS:
                await denied(nobody, sql)
            await denied(
                nobody,
                "INSERT INTO pgnotify.notifications (channel, recipient, subject, body) "
                "VALUES ('email', 'a@example.com', 'Hi', 'x')",
            )
        finally:
            await nobody.close()
    finally:
        await conn.execute(f"REVOKE USAGE ON SCHEMA pgnotify FROM {name}")


def urlsplitted_user(dsn: str) -> str:
    user = urlsplit(dsn).username
    assert user is not None
    return user


async def test_the_worker_role_runs_a_real_delivery(
    conn: asyncpg.Connection, webhook_sink: WebhookSink, login_as: LoginAs
) -> None:
    worker_dsn = await login_as("pgnotify_worker")
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        hook = await producer.fetchval(
            "SELECT pgnotify.enqueue('webhook', $1, payload => '{\"order\": 7}')",
            webhook_sink.url + "/hook",
        )
        inapp = await producer.fetchval(
            "SELECT pgnotify.enqueue('inapp', user_id => 'ada', subject => 'Hi', body => 'x')"
        )
    finally:
        await producer.close()
    settings = conftest.settings_for(worker_dsn, migrate_on_start=False, channels="webhook,inapp")
    async with running(settings) as service:
        rows = await wait_rows(conn, [hook, inapp], {"sent", "failed", "dead"}, service)
    assert [(r["status"], r["last_error"]) for r in rows] == [("sent", None), ("sent", None)]
    assert len(webhook_sink.requests) == 1
    assert webhook_sink.requests[0].json()["data"] == {"order": 7}
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.inbox WHERE user_id = 'ada'") == 1


async def test_the_worker_role_runs_every_builtin_job(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('ada', 'ada@example.com');"
        "INSERT INTO pgnotify.notifications (channel, recipient, user_id, subject, body) "
        "VALUES ('email', 'ada@example.com', 'ada', 'Hi', 'x');"
        "UPDATE pgnotify.notifications SET status = 'held', hold = 'daily', "
        "held_at = now() - interval '2 days'"
    )
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    try:
        for job in await conn.fetch("SELECT name, command FROM pgnotify.jobs WHERE builtin"):
            await worker.execute(job["command"])  # as the job runner does
        assert await worker.fetchval("SELECT count(*) FROM pgnotify.notifications") == 2
        await worker.execute("SELECT * FROM pgnotify.queue_status")
        # but no DDL, and nothing of the producers' chat model
        await denied(worker, "CREATE TABLE pgnotify.x (id int)")
        await denied(worker, "TRUNCATE pgnotify.notifications")
        await denied(worker, "SELECT * FROM pgnotify.chat_messages")
        await denied(
            worker, "INSERT INTO pgnotify.templates (key, channel, body) VALUES ('k', 'email', 'x')"
        )
    finally:
        await worker.close()
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.notifications WHERE digest_of = 'daily'")
        == 1
    )


async def test_an_admin_reads_everything_and_retries(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x')"
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'dead', last_error = 'boom' WHERE id = $1", nid
    )
    admin = await asyncpg.connect(await login_as("pgnotify_admin"))
    try:
        assert await admin.fetchval("SELECT count(*) FROM pgnotify.failed_report") == 1
        assert await admin.fetchval("SELECT pgnotify.retry($1)", nid) is True
        assert await admin.fetchval("SELECT pgnotify.cancel($1)", nid) is True
        await admin.execute(
            "INSERT INTO pgnotify.templates (key, channel, subject, body) "
            "VALUES ('welcome', 'email', 'Welcome', 'Hello')"
        )
        await admin.execute("SELECT pgnotify.set_preference('ada', 'daily', 'email')")
        assert await admin.fetchval("SELECT count(*) FROM pgnotify.events") == 2
        await denied(admin, "DROP TABLE pgnotify.events")
        await denied(admin, "TRUNCATE pgnotify.events")
    finally:
        await admin.close()


GROUPS = ("pgnotify_producer", "pgnotify_worker", "pgnotify_admin")


async def test_a_migration_without_createrole_skips_the_roles_with_a_notice(
    pg_server: conftest.PgServer, empty_dsn: str
) -> None:
    """A schema owner without CREATEROLE migrates fine: the missing roles are a NOTICE, PUBLIC
    loses its rights anyway, and apply_grants() grants the roles once they exist. (The group
    roles already exist in the test cluster, so they are renamed away for the test.)"""
    suffix = uuid.uuid4().hex[:8]
    owner, password = f"pgn_owner_{suffix}", secrets.token_hex(16)
    database = urlsplit(empty_dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_server.admin_dsn)
    renamed: list[str] = []
    conn: asyncpg.Connection | None = None
    try:
        await admin.execute(f"CREATE ROLE {owner} LOGIN NOCREATEROLE PASSWORD '{password}'")
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO {owner}')
        for group in GROUPS:
            await admin.execute(f"ALTER ROLE {group} RENAME TO {group}_{suffix}")
            renamed.append(group)
        parts = urlsplit(empty_dsn)
        owner_dsn = urlunsplit(
            parts._replace(netloc=f"{owner}:{password}@{parts.hostname}:{parts.port}")
        )
        conn = await asyncpg.connect(owner_dsn)
        notices: list[str] = []
        conn.add_log_listener(lambda _c, m: notices.append(str(getattr(m, "message", m))))
        applied = await migrate.migrate(conn)
        assert applied == list(range(1, SCHEMA_VERSION + 1))
        assert any("cannot create role pgnotify_producer" in n for n in notices), notices
        assert any("do not exist, so nothing is granted" in n for n in notices), notices
        public = await conn.fetchval(
            "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, "
            "acldefault('f', p.proowner))) a "
            "WHERE p.pronamespace = 'pgnotify'::regnamespace AND a.grantee = 0"
        )
        assert public == 0
        for group in renamed:  # an admin creates (here: brings back) the roles ...
            await admin.execute(f"ALTER ROLE {group}_{suffix} RENAME TO {group}")
        renamed.clear()
        await conn.execute("SELECT pgnotify.apply_grants()")  # ... and the owner grants them
        assert await conn.fetchval(
            "SELECT has_function_privilege('pgnotify_producer', "
            "'pgnotify.cancel(bigint)', 'EXECUTE')"
        )
    finally:
        if conn is not None:
            await conn.close()
        for group in renamed:
            await admin.execute(f"ALTER ROLE {group}_{suffix} RENAME TO {group}")
        cleanup = await asyncpg.connect(empty_dsn)
        try:
            await cleanup.execute(f"REASSIGN OWNED BY {owner} TO CURRENT_USER")
            await cleanup.execute(f"DROP OWNED BY {owner}")
        finally:
            await cleanup.close()
        await admin.execute(f"DROP ROLE IF EXISTS {owner}")
        await admin.close()


async def test_the_worker_role_may_run_every_worker_query(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    """Every statement of adapters/queries.py, as pgnotify_worker (CANCEL, RETRY, REPLAY* and
    PURGE* are the CLI's admin commands). A new query must be added here, which proves its
    grants."""
    import datetime

    from pgnotify_worker.adapters import queries

    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Hi', body => 'x', "
        "user_id => 'ada', category => 'billing')"
    )
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    arrays = ([nid], [1], ["sent"], ["sent"], [0.0], [None], [None], ["webhook"], [None])
    args: dict[str, tuple[object, ...]] = {
        "CLAIM": ("email", 10, "w", 30.0, None),
        "COMPLETE": ("w", *arrays, [1.0], [None], [0], [None]),
        "HEARTBEAT": ("w", [nid], [1], 30.0),
        "RELEASE": ("w", [nid], [1]),
        "REAP": (10,),
        "PROMOTE": (10,),
        "NEXT_DUE": (),
        "TEMPLATE": ("welcome", "email", [""]),
        "INBOX_DELIVER": (nid, "ada", None, "Hi", "x", "{}"),
        "INBOX_DELIVER_MANY": ([nid], ["ada"], [None], ["Hi"], ["x"], ["{}"]),
        "QUEUE_STATUS": (),
        "PING": ("pgnotify_test", "x"),
        "ALIVE": (),
        "SCHEMA_VERSION": (),
        "ENQUEUE": (
            "webhook",
            "https://example.com/h",
            None,
            "{}",
            *[None] * 6,
            0,
            None,
            None,
            None,
        ),
        "RECENT_ERRORS": (10,),
        "DEVICES_OF": ("ada",),
        "DEACTIVATE_DEVICE": ("tok-1", "unregistered"),
        "SUPPRESS": ("email", "ada@example.com", "hard_bounce", "resend", None),
        "NOTE": (nid, "device_sent", 1, "w", "fcm", None, None, None),
        "PROVIDER_EVENT": ("resend", nid, None, "delivered", None, None, None, "ext-1"),
        "SEND_FACTS": ([nid], ["ada@example.com"]),
        "JOB_CLAIM": (),
        "JOB_START": ("retention", soon, soon, "w"),
        "JOB_FINISH": (1, "succeeded", 0, None),
        "JOBS_UNSCHEDULED": (),
        "JOB_SCHEDULE": ("retention", soon),
        "JOB_DISABLE": ("no-such-job", "disabled: test"),
        "JOBS_NEXT_DUE": (),
        "JOB_COMMAND": ("digest_daily", "SELECT pgnotify.build_digests('daily')"),
        "JOBS_STATUS": (),
        "OPT_OUT": ("ada", "*"),
        "CATEGORY_IS_CRITICAL": ("billing",),
        "IN_SECONDS": (5.0,),
        "OLDEST_TRANSACTION": (),
        "QUEUE_DEAD_TUPLES": (),
        "SCHEMA_EXISTS": (),
        "STATEMENT_TIMEOUT": ("5s",),
        "DESTINATIONS": (),
        "DESTINATION_FAILING": ("https://hooks.example.com:443", "http_503", 3600.0),
        "DESTINATION_RECOVERED": ("https://hooks.example.com:443",),
        "LIMIT_UPSERT": ("resend", 5.0, 5.0),
        "TAKE_TOKENS": ("resend", 1, False, 5.0, 5.0),
        "GIVE_BACK_TOKENS": ("resend", 1),
        "PAUSE_PROVIDER": ("resend", 1.0, "429"),
        "PROVIDER_LIMITS": (),
        "MARK_REAL": (["email"],),
        "REAL_SEEN": (["email"],),
        "CHANNEL_HEALTH": ("w", ["email"], [True], 30.0),
        "SHOW_NOTIFICATION": (nid,),
        "SHOW_TIMELINE": (nid,),
        "EVENTS_CURSOR": (),
        "EVENTS_AFTER": (0, 10),
        "OUTCOME": (nid,),
        "WAKE_TAKE": ("webhook",),
        "WAKE_GIVE_BACK": ("webhook",),
        "WAKE_HANDOVER_DONE": ("webhook",),
        "WAKE_OTHERS": ("webhook",),
    }
    admin_only = {"CANCEL", "RETRY", "REPLAY_CANDIDATES", "REPLAY", "PURGE_PREVIEW", "PURGE"}
    assert set(args) == set(queries.ALL) - admin_only
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    try:
        async with worker.transaction():
            for name, values in args.items():
                try:
                    await worker.fetch(queries.ALL[name], *values)
                except asyncpg.PostgresError as exc:  # pragma: no cover - says which
                    pytest.fail(f"worker role cannot run {name}: {exc}")
        await denied(worker, queries.CANCEL, nid)
    finally:
        await worker.close()
