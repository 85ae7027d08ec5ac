"""Migration 0006: least privilege. Real LOGIN roles (cluster-wide, so unique per test and dropped
after it) that are members of pgnotify_producer, pgnotify_worker or pgnotify_admin, or of
nothing, connect with asyncpg and do what their role allows, and nothing else."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import migrate
from tests import conftest
from tests.support.db import wait_rows
from tests.support.pgcluster import TempCluster
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
    "SELECT pgnotify.take_throttle('u', 'news', 'email')",
    "SELECT pgnotify.set_throttle('news', 3, interval '1 day')",
    "SELECT pgnotify.set_batching('news', interval '5 minutes')",
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


async def test_a_producer_batches_subscribes_and_notifies_a_topic_and_the_worker_closes(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    """Schema 0019: a producer may insert with a batch_key, manage topics and subscriptions and
    call notify_topic; the worker role closes a due window and counts throttles."""
    from pgnotify_worker.adapters import queries

    await conn.execute("SELECT pgnotify.set_batching('thread', interval '5 minutes')")
    await conn.execute("SELECT pgnotify.set_throttle('thread', 2, interval '1 hour')")
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        for n in range(2):
            await producer.execute(
                "INSERT INTO pgnotify.notifications (channel, recipient, category, body, "
                "payload, batch_key) VALUES ('inapp', 'ada', 'thread', 'x', $1, 't1')",
                f'{{"n": {n}}}',
            )
        assert await producer.fetchval("SELECT pgnotify.create_topic('launch')") is True
        assert await producer.fetchval("SELECT pgnotify.subscribe('launch', 'ada')") is True
        assert await producer.fetchval("SELECT pgnotify.subscribe('launch', 'bob')") is True
        assert await producer.fetchval("SELECT pgnotify.unsubscribe('launch', 'bob')") is True
        assert await producer.fetchval("SELECT count(*) FROM pgnotify.topic_subscriptions") == 1
        made = await producer.fetchval(
            "SELECT pgnotify.notify_topic('launch', 'news', body => 'We launched', "
            "channels => '{inapp}', idempotency_key => 'launch-1')"
        )
        assert made == 1
        await denied(producer, "SELECT * FROM pgnotify.batches")
        await denied(producer, "DELETE FROM pgnotify.topic_subscriptions")
    finally:
        await producer.close()

    await conn.execute(
        "UPDATE pgnotify.notifications SET run_at = now() WHERE batch_of IS NOT NULL"
    )
    worker = await asyncpg.connect(await login_as("pgnotify_worker"))
    try:
        await worker.fetch(queries.PROMOTE, 10)
        take = await worker.fetchrow(queries.TAKE_THROTTLE, "ada", "thread", "inapp")
        assert (take["allowed"], take["used"], take["max_sends"]) == (True, 1, 2)
        # a throttled send folded into a batch, as COMPLETE writes it
        folded = await worker.fetchval(
            "UPDATE pgnotify.notifications SET status = 'held', hold = 'batch' "
            "WHERE category = 'news' RETURNING batch_id"
        )
        assert folded is not None
    finally:
        await worker.close()
    sender = await conn.fetchrow(
        "SELECT status, payload FROM pgnotify.notifications WHERE batch_of IS NOT NULL"
    )
    assert sender["status"] == "queued"
    assert sender["payload"]["count"] == 2


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


def console_query_args(nid: int) -> dict[str, tuple[object, ...]]:
    """The admin console's statements (it is served by the worker, with the worker's role)."""
    f = ("dead", "email", "billing", "ada", None)
    who = ("console:admin@127.0.0.1", '{"by": "admin"}')
    return {
        "CONSOLE_CUSTOM_PLANS": (),
        "CONSOLE_LIST": (*f, None, 50),
        "CONSOLE_BULK_PREVIEW": (*f, ["failed", "dead"], 100),
        "CONSOLE_BULK_CANCEL": (*f, nid, *who),
        "CONSOLE_BULK_RETRY": (*f, nid, *who),
        "CONSOLE_RETRY": (nid, *who),
        "CONSOLE_CANCEL": (nid, *who),
        "CONSOLE_AUDIT": ("channel_paused", *who),
        "CONSOLE_NOTIFICATION": (nid,),
        "CONSOLE_EVENTS": (nid,),
        "CONSOLE_THROUGHPUT": (),
        "CONSOLE_WORKERS": (),
        "CONSOLE_PAUSED": (),
        "CONSOLE_PAUSE": ("sms", "test", "console:admin@127.0.0.1"),
        "CONSOLE_RESUME": ("sms", "console:admin@127.0.0.1"),
        "CONSOLE_DESTINATIONS": (),
        "CONSOLE_JOBS": (),
        "CONSOLE_RUN_JOB": ("retention",),
        "CONSOLE_DEAD_LETTERS": (),
        "CONSOLE_RETRY_ERROR": ("email", "", nid, *who),
        "CONSOLE_TEMPLATES": (),
        "CONSOLE_TEMPLATE_VERSIONS": ("welcome",),
        "CONSOLE_CONTACT": ("ada",),
        "CONSOLE_DEVICES": ("ada",),
        "CONSOLE_PREFERENCES": ("ada",),
        "CONSOLE_CONSENTS": ("ada",),
        "CONSOLE_SUPPRESSIONS": (["ada@example.com"],),
    }


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
    await conn.execute(
        'SELECT pgnotify.define_workflow(\'w\', \'[{"kind": "send", "channel": "inapp"}]\')'
    )
    run = await conn.fetchval("SELECT pgnotify.trigger('w', 'ada')")
    arrays = ([nid], [1], ["sent"], ["sent"], [0.0], [None], [None], ["webhook"], [None])
    args: dict[str, tuple[object, ...]] = {
        "CLAIM": ("email", 10, "w", 30.0, None),
        "COMPLETE": ("w", *arrays, [1.0], [None], [0], [None], [None]),
        "HEARTBEAT": ("w", [nid], [1], 30.0),
        "RELEASE": ("w", [nid], [1]),
        "REAP": (10,),
        "PROMOTE": (10,),
        "NEXT_DUE": (),
        "TEMPLATE": ("welcome", "email", [""]),
        "INBOX_DELIVER": (nid, "ada", None, "Hi", "x", "{}"),
        "INBOX_DELIVER_MANY": ([nid], ["ada"], [None], ["Hi"], ["x"], ["{}"]),
        "QUEUE_STATUS": (),
        "STATUS_NOTIFY": (),
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
        "TAKE_THROTTLE": ("ada", "billing", "email"),
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
        "PREFERENCE_CATEGORIES": ("ada",),
        "PREFERENCE_CONTACT": ("ada",),
        "SAVE_PREFERENCES": ("ada", '{"preferences": {"chat": {"email": "off"}}}', "test"),
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
        "CHANNEL_HEALTH": ("w", ["email"], [True], 30.0, "0.1.0"),
        "SHOW_NOTIFICATION": (nid,),
        "SHOW_TIMELINE": (nid,),
        "EVENTS_CURSOR": (),
        "EVENTS_AFTER": (0, 10),
        "OUTCOME": (nid,),
        "WAKE_TAKE": ("webhook",),
        "WAKE_GIVE_BACK": ("webhook",),
        "WAKE_HANDOVER_DONE": ("webhook",),
        "WAKE_OTHERS": ("webhook",),
        "INBOX_PAGE": ("ada", 2**63 - 1, 20),
        "INBOX_PAGE_CATEGORY": ("ada", 2**63 - 1, 20, "billing"),
        "INBOX_PAGE_ARCHIVED": ("ada", 2**63 - 1, 20),
        "INBOX_PAGE_ARCHIVED_CATEGORY": ("ada", 2**63 - 1, 20, "billing"),
        "INBOX_PAGE_ANY": ("ada", 2**63 - 1, 20),
        "INBOX_PAGE_ANY_CATEGORY": ("ada", 2**63 - 1, 20, "billing"),
        "INBOX_COUNTS": ("ada",),
        "INBOX_COUNTS_MANY": (["ada"],),
        "INBOX_ROWS": ([1],),
        "INBOX_SINCE": ("ada", 0, 10),
        "INBOX_FEED_BATCH": (["ada"], [0], 10),
        "INBOX_LATEST_SEQ": ("ada",),
        "INBOX_READ": ("ada", [1]),
        "INBOX_READ_ALL": ("ada",),
        "INBOX_UNREAD": ("ada", [1]),
        "INBOX_SEEN": ("ada", [1]),
        "INBOX_SEEN_ALL": ("ada",),
        "INBOX_ARCHIVE": ("ada", [1]),
        "INBOX_ARCHIVE_ALL": ("ada",),
        "INBOX_UNARCHIVE": ("ada", [1]),
        "WF_CLAIM": (None, 5),
        "WF_FACTS": (run,),
        "WF_PREFERENCE": ("ada", "email", None),
        "WF_SEND": ("workflow:1:x", "ada", "inapp", None, None, None, "Hi", None, "{}", 0),
        "WF_SENT_BEFORE": ("workflow:1:x",),
        "WF_FOLD": (nid, "workflow:w:s", "k", 60.0, 10),
        "WF_RECORD": (run, "step1", "send", "created", None, None, "w"),
        "WF_MOVE": (run, "step1", soon, "running", None, "delay"),
        "WORKFLOW_STATUS": (),
        "WF_CANCEL": (run, "test"),
        "WF_NEXT_DUE": (),
        **console_query_args(nid),
    }
    admin_only = {
        "CANCEL",
        "RETRY",
        "REPLAY_CANDIDATES",
        "REPLAY",
        "PURGE_PREVIEW",
        "PURGE_PREVIEW_RUNS",
        "PURGE",
    }
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


async def test_producers_trigger_and_cancel_runs_and_the_worker_role_evaluates_them(
    conn: asyncpg.Connection, login_as: LoginAs
) -> None:
    from pgnotify_worker.adapters import db as dbmod
    from pgnotify_worker.adapters import queries
    from pgnotify_worker.adapters.workflow_runner import WorkflowRunner

    admin = await asyncpg.connect(await login_as("pgnotify_admin"))
    try:  # an admin (or the schema owner) defines workflows
        steps = [{"kind": "send", "channel": "inapp", "body": "Hi"}]
        assert (
            await admin.fetchval(
                "SELECT pgnotify.define_workflow('hello', $1::text::jsonb)", json.dumps(steps)
            )
            == 1
        )
    finally:
        await admin.close()
    producer = await asyncpg.connect(await login_as("pgnotify_producer"))
    try:
        run = await producer.fetchval(
            "SELECT pgnotify.trigger('hello', 'ada', '{\"n\": 1}', idempotency_key => 'k1')"
        )
        assert (
            await producer.fetchval(
                "SELECT pgnotify.trigger('hello', 'ada', '{\"n\": 1}', idempotency_key => 'k1')"
            )
            == run
        )
        other = await producer.fetchval("SELECT pgnotify.trigger('hello', 'bo')")
        assert await producer.fetchval("SELECT pgnotify.cancel_run($1::bigint, 'no')", other)
        assert await producer.fetchval("SELECT pgnotify.cancel_run('no-such-key')") is False
        # runs are not a producer's to read, change or define
        await denied(producer, "SELECT * FROM pgnotify.workflow_runs")
        await denied(producer, "SELECT * FROM pgnotify.workflow_runs_view")
        await denied(producer, "SELECT * FROM pgnotify.workflow_run_steps")
        await denied(producer, "UPDATE pgnotify.workflow_runs SET status = 'completed'")
        await denied(producer, "SELECT pgnotify.define_workflow('x', '[]')")
        await denied(producer, "INSERT INTO pgnotify.workflows (name, version) VALUES ('x', 1)")
        await denied(producer, queries.WF_CLAIM, None, 1)
    finally:
        await producer.close()

    worker_dsn = await login_as("pgnotify_worker")
    pool = await dbmod.create_pool(worker_dsn, min_size=1, max_size=2)
    try:
        runner = WorkflowRunner(pool, "w")
        assert await runner.run_one()
        assert not await runner.run_one()  # the cancelled run is left alone
        async with pool.acquire() as worker:
            await denied(worker, "SELECT pgnotify.trigger('hello', 'x')")
            await denied(worker, "SELECT pgnotify.define_workflow('x', '[]')")
            await denied(worker, "DELETE FROM pgnotify.workflow_runs")
    finally:
        await pool.close()
    statuses = await conn.fetch("SELECT id, status FROM pgnotify.workflow_runs ORDER BY id")
    assert [(r["id"], r["status"]) for r in statuses] == [(run, "completed"), (other, "cancelled")]
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE idempotency_key = $1",
            f"workflow:{run}:step1",
        )
        == 1
    )


# Every privilege held on an object of schema pgnotify by a role of ROLES or by PUBLIC: tables,
# views, sequences (pg_class), their columns (pg_attribute), routines (pg_proc, NULL = PUBLIC may
# execute), the schema itself, and default privileges (pg_default_acl).
ROLES = ("pgnotify_producer", "pgnotify_worker", "pgnotify_admin", "pgnotify_scaler")
PRIVILEGES = """
WITH acl (kind, object, grantee, grantor, privilege, grantable) AS (
    SELECT 'relation ' || c.relkind::text, c.oid::regclass::text, a.grantee, a.grantor,
           a.privilege_type, a.is_grantable
    FROM pg_class c, aclexplode(c.relacl) a
    WHERE c.relnamespace = 'pgnotify'::regnamespace
    UNION ALL
    SELECT 'column', c.oid::regclass::text || '.' || quote_ident(att.attname), a.grantee,
           a.grantor, a.privilege_type, a.is_grantable
    FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid, aclexplode(att.attacl) a
    WHERE c.relnamespace = 'pgnotify'::regnamespace AND att.attnum > 0 AND NOT att.attisdropped
    UNION ALL
    SELECT 'routine', p.oid::regprocedure::text, a.grantee, a.grantor, a.privilege_type,
           a.is_grantable
    FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
    WHERE p.pronamespace = 'pgnotify'::regnamespace
    UNION ALL
    SELECT 'schema', n.nspname, a.grantee, a.grantor, a.privilege_type, a.is_grantable
    FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'pgnotify'
    UNION ALL
    SELECT 'default ' || d.defaclobjtype::text, coalesce(d.defaclnamespace::regnamespace::text, '*'),
           a.grantee, a.grantor, a.privilege_type, a.is_grantable
    FROM pg_default_acl d, aclexplode(d.defaclacl) a
)
SELECT kind, object,
       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE grantee::regrole::text END AS grantee,
       grantor::regrole::text AS grantor, privilege, grantable
FROM acl
WHERE grantee = 0 OR grantee::regrole::text = ANY($1::text[])
"""


async def privileges_of(conn: asyncpg.Connection) -> set[tuple[object, ...]]:
    """PRIVILEGES as a set; the daily partitions of events named alike (a migration just after
    midnight UTC makes another day's)."""
    return {
        (row[0], re.sub(r"events_p\d{8}", "events_pYYYYMMDD", row[1]), *tuple(row)[2:])
        for row in await conn.fetch(PRIVILEGES, list(ROLES))
    }


@pytest.fixture
def own_cluster() -> Iterator[TempCluster]:
    """A throwaway cluster: roles are cluster-wide, and this test creates the groups."""
    try:
        cluster = TempCluster()
    except RuntimeError as exc:  # no server binaries here (PGNOTIFY_TEST_DSN set)
        pytest.skip(str(exc))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


async def test_roles_created_after_migrating_get_every_grant_from_apply_grants(
    own_cluster: TempCluster,
) -> None:
    """Schema 0026: an operator who migrates first (as an owner without CREATEROLE), creates the
    roles afterwards and runs SELECT pgnotify.apply_grants() ends with exactly the privileges of
    a database migrated with the roles present: every grant of 0007.. included, so the worker
    role can claim and the scaler can read the backlog."""
    from pgnotify_worker.adapters import queries

    superuser = await asyncpg.connect(own_cluster.dsn())
    owner = "pgn_owner"
    try:
        await superuser.execute(f"CREATE ROLE {owner} LOGIN NOCREATEROLE")
        for database in ("with_roles", "roles_later"):
            await superuser.execute(f"CREATE DATABASE {database} OWNER {owner}")
        dsn = own_cluster.dsn("{}").replace("postgres@", f"{owner}@", 1)

        # 1. migrated before any role exists (the migration can create none)
        later = await asyncpg.connect(dsn.format("roles_later"))
        try:
            assert await migrate.migrate(later) == list(range(1, SCHEMA_VERSION + 1))
            assert await privileges_of(later) == set()  # not even PUBLIC
        finally:
            await later.close()

        # 2. an admin creates the roles, as the migration's NOTICE says
        for role in ROLES:
            await superuser.execute(f"CREATE ROLE {role} NOLOGIN")

        # 3. the normal path: migrated with the roles present
        normal = await asyncpg.connect(dsn.format("with_roles"))
        try:
            assert await migrate.migrate(normal) == list(range(1, SCHEMA_VERSION + 1))
            expected = await privileges_of(normal)
        finally:
            await normal.close()

        # 4. the schema owner runs apply_grants() in the database migrated without the roles
        later = await asyncpg.connect(dsn.format("roles_later"))
        try:
            await later.execute("SELECT pgnotify.apply_grants()")
            got = await privileges_of(later)
            await later.execute("SELECT pgnotify.apply_grants()")  # idempotent
            assert await privileges_of(later) == got
        finally:
            await later.close()

        assert sorted(expected - got, key=str) == []  # what the late roles would lack
        assert sorted(got - expected, key=str) == []  # and what they would have too much
        assert {(r[2], r[0]) for r in got} >= {
            ("pgnotify_worker", "routine"),
            ("pgnotify_worker", "column"),
            ("pgnotify_worker", "relation S"),
            ("pgnotify_producer", "column"),
            ("pgnotify_scaler", "schema"),
        }

        # what the worker and the autoscaler run, as login roles of the late database
        await superuser.execute("CREATE ROLE pgn_w LOGIN IN ROLE pgnotify_worker")
        await superuser.execute("CREATE ROLE pgn_k LOGIN IN ROLE pgnotify_scaler")
        worker = await asyncpg.connect(dsn.format("roles_later").replace(owner, "pgn_w", 1))
        try:
            await worker.fetch(queries.CLAIM, "email", 10, "w", 30.0, None)
            await worker.fetch(queries.DESTINATIONS)
            await worker.fetch(queries.WF_CLAIM, None, 5)
        finally:
            await worker.close()
        scaler = await asyncpg.connect(dsn.format("roles_later").replace(owner, "pgn_k", 1))
        try:
            assert await scaler.fetchval("SELECT ready FROM pgnotify.sendable_backlog") == 0
            await denied(scaler, "SELECT count(*) FROM pgnotify.notifications")
        finally:
            await scaler.close()
    finally:
        await superuser.close()


async def test_a_later_migration_extends_apply_grants_with_a_row(conn: asyncpg.Connection) -> None:
    """Schema 0026: a row in pgnotify.role_grants is granted by apply_grants() (quoted through
    regclass, column lists included); a row naming an object that is gone is a clear error."""
    await conn.execute(
        'CREATE TABLE pgnotify."Odd name" (id int, note text);'
        "INSERT INTO pgnotify.role_grants (since, role, kind, object, columns, privileges) VALUES "
        "(99, 'pgnotify_worker', 'TABLE', 'pgnotify.\"Odd name\"', '{}', '{SELECT,INSERT}'),"
        "(99, 'pgnotify_producer', 'TABLE', 'pgnotify.\"Odd name\"', '{note}', '{UPDATE}'),"
        "(99, 'pgnotify_nobody', 'TABLE', 'pgnotify.\"Odd name\"', '{}', '{DELETE}')"
    )
    await conn.execute("SELECT pgnotify.apply_grants()")
    table = 'pgnotify."Odd name"'
    checks = [
        ("pgnotify_worker", "SELECT, INSERT", True),
        ("pgnotify_worker", "UPDATE", False),
        ("pgnotify_producer", "SELECT", False),
    ]
    for role, privilege, allowed in checks:
        held = await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", role, table, privilege)
        assert held is allowed, (role, privilege)
    assert await conn.fetchval(
        "SELECT has_column_privilege('pgnotify_producer', $1, 'note', 'UPDATE')", table
    )
    assert not await conn.fetchval(
        "SELECT has_column_privilege('pgnotify_producer', $1, 'id', 'UPDATE')", table
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO pgnotify.role_grants (since, role, kind, object, privileges) "
            "VALUES (99, 'pgnotify_worker', 'TABLE', 'pgnotify.x', '{ALL}')"
        )
    await conn.execute('DROP TABLE pgnotify."Odd name"')
    with pytest.raises(asyncpg.RaiseError, match=r'names TABLE pgnotify\."Odd name", which does'):
        await conn.execute("SELECT pgnotify.apply_grants()")
