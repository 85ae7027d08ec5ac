"""Producer mistakes get an answer instead of silence (schema 0008): an unknown template or an
unreachable user in notify_user(), an idempotency key used again for a different notification,
bad values for preferences, devices, consents, contacts, categories, templates and suppressions.
Each refusal is SQLSTATE 23514 with a `pgnotify:` message that names the thing, and stores
nothing; the same idempotent call again still returns the same id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import migrate

MIGRATION_8 = Path(migrate.schema_dir()) / "0008_producer_errors.sql"


async def count(conn: asyncpg.Connection, table: str = "notifications") -> int:
    value: int = await conn.fetchval(f"SELECT count(*) FROM pgnotify.{table}")
    return value


async def refused(
    conn: asyncpg.Connection, sql: str, *args: object
) -> asyncpg.exceptions.CheckViolationError:
    """Run `sql`, expect a pgnotify: refusal (23514), return it."""
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute(sql, *args)
    error = caught.value
    assert error.sqlstate == "23514"
    assert error.message.startswith("pgnotify: "), error.message
    assert "violates" not in error.message and error.constraint_name is None
    return error


async def contact(conn: asyncpg.Connection, user: str, **fields: str) -> None:
    names = ["user_id", *fields]
    marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    await conn.execute(
        f"INSERT INTO pgnotify.contacts ({', '.join(names)}) VALUES ({marks})",
        user,
        *fields.values(),
    )


async def template(conn: asyncpg.Connection, key: str, channel: str) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES ($1, $2, 'Hi', 'Hello')",
        key,
        channel,
    )


# --- notify_user: templates, channels, reachability -----------------------------------------------


async def test_notify_user_refuses_a_misspelt_template_naming_it_and_the_users_channels(
    conn: asyncpg.Connection,
) -> None:
    await contact(conn, "bob", email="bob@example.com")
    await template(conn, "welcome", "email")
    error = await refused(conn, "SELECT pgnotify.notify_user('bob', 'news', template => 'welcom')")
    assert error.column_name == "template"
    assert "unknown template 'welcom'" in error.message
    assert "user 'bob' can be reached on email, inapp" in error.message
    assert await count(conn) == 0


async def test_notify_user_refuses_a_template_that_exists_for_none_of_the_users_channels(
    conn: asyncpg.Connection,
) -> None:
    await template(conn, "code", "sms")  # the user has no phone
    error = await refused(
        conn,
        "SELECT pgnotify.notify_user('nobody', NULL, template => 'code', channels => '{email,inapp}')",
    )
    assert error.column_name == "template"
    assert "template 'code' exists for sms" in error.message
    assert "but user 'nobody' can be reached on inapp only" in error.message
    assert await count(conn) == 0


async def test_notify_user_refuses_a_user_reachable_on_none_of_the_channels(
    conn: asyncpg.Connection,
) -> None:
    error = await refused(
        conn, "SELECT pgnotify.notify_user('ghost', NULL, body => 'x', channels => '{email,sms}')"
    )
    assert error.column_name == "user_id"
    assert "user 'ghost' cannot be reached on any of email, sms" in error.message
    assert "inapp" in error.hint  # the way out for a producer that must not fail
    assert await count(conn) == 0


async def test_a_bulk_caller_may_skip_unreachable_users_with_a_notice_but_not_typos(
    conn: asyncpg.Connection,
) -> None:
    await template(conn, "code", "sms")
    notices: list[str] = []
    conn.add_log_listener(lambda _c, message: notices.append(message.message))
    await conn.execute("SET pgnotify.notify_user_unreachable = 'skip'")
    assert (
        await conn.fetchval(
            "SELECT pgnotify.notify_user('ghost', NULL, body => 'x', channels => '{email,sms}')"
        )
        == []
    )
    assert (
        await conn.fetchval("SELECT pgnotify.notify_user('ghost', NULL, template => 'code')") == []
    )
    await conn.execute("SELECT 1")  # the notices have arrived
    assert notices == [
        "pgnotify: user 'ghost' cannot be reached on any of email, sms",
        "pgnotify: template 'code' exists for sms, but user 'ghost' can be reached on inapp only",
    ]
    error = await refused(conn, "SELECT pgnotify.notify_user('ghost', NULL, template => 'cod')")
    assert "unknown template 'cod'" in error.message  # a typo is never skipped
    assert await count(conn) == 0


async def test_notify_user_refuses_an_unknown_channel_and_a_missing_body(
    conn: asyncpg.Connection,
) -> None:
    await contact(conn, "ann", email="ann@example.com")
    error = await refused(
        conn, "SELECT pgnotify.notify_user('ann', NULL, body => 'x', channels => '{email,mail}')"
    )
    assert (error.column_name, "unknown channel 'mail'" in error.message) == ("channel", True)
    error = await refused(
        conn, "SELECT pgnotify.notify_user('ann', NULL, subject => 'Hi', channels => '{email}')"
    )
    assert "a notification to user 'ann' on email needs a template or a body" in error.message
    assert await count(conn) == 0


async def test_notify_user_still_skips_what_the_user_turned_off_but_not_critical_categories(
    conn: asyncpg.Connection,
) -> None:
    await contact(conn, "joe", email="joe@example.com")
    await conn.execute("SELECT pgnotify.set_preference('joe', 'off')")
    # the user's choice is no mistake: nothing made, no error
    assert (
        await conn.fetchval(
            "SELECT pgnotify.notify_user('joe', 'news', subject => 's', body => 'x')"
        )
        == []
    )
    # a critical category ignores opt-outs at send time, so it must be enqueued at all
    ids = await conn.fetchval(
        "SELECT pgnotify.notify_user('joe', 'security', subject => 'Code', body => 'code 4711', "
        "channels => '{email}')"
    )
    assert len(ids) == 1


# --- idempotency keys ----------------------------------------------------------------------------


async def test_enqueue_refuses_a_key_used_for_another_recipient_and_repeats_the_same_call(
    conn: asyncpg.Connection,
) -> None:
    same = "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 's', body => 'x', idempotency_key => 'order-7')"
    first = await conn.fetchval(same)
    error = await refused(
        conn,
        "SELECT pgnotify.enqueue('email', 'bob@example.com', subject => 's', body => 'x', idempotency_key => 'order-7')",
    )
    assert error.column_name == "idempotency_key"
    assert error.message.startswith(
        'pgnotify: idempotency key "order-7" was used for a different notification '
        "(channel email, recipient a***@e***.com)"
    )
    assert "differs in recipient" in error.message
    assert "ada@example.com" not in error.message  # masked, as in the logs
    assert await conn.fetchval(same) == first  # the same call still answers with its id
    assert await count(conn) == 1


async def test_enqueue_refuses_a_key_used_for_another_channel_or_payload_without_echoing_it(
    conn: asyncpg.Connection,
) -> None:
    await conn.fetchval(
        "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'x', payload => '{\"code\": \"4711\"}', "
        "idempotency_key => 'k-1')"
    )
    error = await refused(
        conn,
        "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 's', body => 'x', idempotency_key => 'k-1')",
    )
    assert "(channel sms, recipient +*******0123)" in error.message
    assert "differs in channel, recipient, payload" in error.message
    error = await refused(
        conn,
        "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'x', "
        "payload => '{\"code\": \"9999\"}', idempotency_key => 'k-1')",
    )
    assert "differs in payload" in error.message
    assert "4711" not in error.message and "9999" not in error.message
    assert await count(conn) == 1


async def test_a_retry_may_change_delivery_options_but_not_the_notification(
    conn: asyncpg.Connection,
) -> None:
    sql = (
        "SELECT pgnotify.enqueue('webhook', 'https://example.com/h', payload => '{\"a\": 1}', "
        "run_at => now() + $1::text::interval, priority => $2, idempotency_key => 'remind-3')"
    )
    first = await conn.fetchval(sql, "1 hour", 0)
    assert await conn.fetchval(sql, "2 hours", 5) == first  # a retry computes a later run_at
    run_at = await conn.fetchval(
        "SELECT run_at - created_at FROM pgnotify.notifications WHERE id = $1", first
    )
    assert run_at.total_seconds() == 3600  # the first row stands


async def test_insert_on_conflict_refuses_a_different_notification_and_skips_the_same_one(
    conn: asyncpg.Connection,
) -> None:
    insert = (
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, idempotency_key) "
        "VALUES ('email', $1, 's', 'x', 'ins-1') ON CONFLICT DO NOTHING"
    )
    assert await conn.execute(insert, "ada@example.com") == "INSERT 0 1"
    assert await conn.execute(insert, "ada@example.com") == "INSERT 0 0"  # the same: skipped
    error = await refused(conn, insert, "eve@example.com")
    assert 'idempotency key "ins-1" was used for a different notification' in error.message
    # the key in a second row of one statement is checked too
    error = await refused(
        conn,
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, idempotency_key) "
        "VALUES ('email', 'a@b.co', 's', 'x', 'ins-2'), ('email', 'c@d.co', 's', 'x', 'ins-2') "
        "ON CONFLICT DO NOTHING",
    )
    assert 'idempotency key "ins-2"' in error.message
    assert await count(conn) == 1


async def test_a_key_committed_by_a_concurrent_transaction_is_compared_too(
    dsn: str, conn: asyncpg.Connection
) -> None:
    other = await asyncpg.connect(dsn)
    third = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        first = await other.fetchval(
            "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 's', body => 'x', idempotency_key => 'race')"
        )
        # both wait on the uncommitted key; the trigger cannot see it yet
        different = asyncio.ensure_future(
            conn.fetchval(
                "SELECT pgnotify.enqueue('email', 'eve@example.com', subject => 's', body => 'x', idempotency_key => 'race')"
            )
        )
        same = asyncio.ensure_future(
            third.fetchval(
                "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 's', body => 'x', idempotency_key => 'race')"
            )
        )
        await asyncio.sleep(0.3)
        assert not different.done() and not same.done()
        await tx.commit()
        with pytest.raises(asyncpg.CheckViolationError, match='idempotency key "race" was used'):
            await different
        assert await same == first
    finally:
        await other.close()
        await third.close()
    assert await count(conn) == 1


async def test_notify_user_repeats_return_the_same_ids_and_a_changed_call_is_refused(
    conn: asyncpg.Connection,
) -> None:
    await contact(conn, "ada", email="ada@example.com")
    sql = (
        "SELECT pgnotify.notify_user('ada', 'orders', subject => 'Order', body => 'Order {{ n }}', "
        "payload => $1, idempotency_key => 'order-9')"
    )
    first = await conn.fetchval(sql, {"n": 9})
    assert len(first) == 2  # email, inapp
    assert await conn.fetchval(sql, {"n": 9}) == first  # used to be []
    error = await refused(conn, sql, {"n": 10})
    assert error.column_name == "idempotency_key"
    assert 'idempotency key "order-9" was used for a different notification' in error.message
    assert "differs in payload" in error.message
    error = await refused(
        conn,
        "SELECT pgnotify.notify_user('ada', 'orders', subject => 'Order', body => 'Order {{ n }}', "
        "payload => '{\"n\": 9}', channels => '{email}', idempotency_key => 'order-9')",
    )
    assert "differs in channels" in error.message  # the earlier call made an inapp row too
    # enqueue() under a key notify_user() derived is the same check
    error = await refused(
        conn,
        "SELECT pgnotify.enqueue('email', 'ada@example.com', subject => 'Order', "
        "body => 'other', idempotency_key => 'order-9:email')",
    )
    assert "differs in user_id, category, payload, body" in error.message
    assert await count(conn) == 2


# --- the other tables producers write -------------------------------------------------------------


async def test_set_preference_names_the_allowed_values(conn: asyncpg.Connection) -> None:
    error = await refused(conn, "SELECT pgnotify.set_preference('ada', 'sometimes', 'email')")
    assert error.column_name == "setting" and error.table_name == "preferences"
    assert "unknown preference setting 'sometimes'" in error.message
    assert "immediate, daily, weekly or off" in error.message
    error = await refused(conn, "SELECT pgnotify.set_preference('ada', 'off', 'mail')")
    assert "unknown preference channel 'mail': use *, email, sms, push, webhook or inapp" in (
        error.message
    )
    await refused(conn, "SELECT pgnotify.set_preference('ada', NULL)")
    assert await count(conn, "preferences") == 0


async def test_devices_consents_and_contacts_name_the_field(conn: asyncpg.Connection) -> None:
    error = await refused(conn, "SELECT pgnotify.register_device('ada', 'windows', 'tok-1')")
    assert error.column_name == "platform" and "use ios, android or web" in error.message
    error = await refused(conn, "SELECT pgnotify.register_device('ada', 'ios', '  ')")
    assert error.column_name == "token"
    assert await count(conn, "devices") == 0

    # used to be a foreign key violation (23503) naming consents_category_fkey
    error = await refused(conn, "SELECT pgnotify.record_consent('ada', 'marketng', true, 'form')")
    assert error.column_name == "category" and "unknown category 'marketng'" in error.message
    assert "marketing" in error.hint
    await refused(conn, "SELECT pgnotify.record_consent('ada', 'marketing', NULL, 'form')")
    assert await count(conn, "consents") == 0 and await count(conn, "consent_history") == 0

    error = await refused(
        conn, "INSERT INTO pgnotify.contacts (user_id, quiet_start) VALUES ('ada', '22:00')"
    )
    assert error.column_name == "quiet_end" and "quiet_start and quiet_end" in error.message
    error = await refused(
        conn, "INSERT INTO pgnotify.contacts (user_id, phone) VALUES ('ada', '1 2')"
    )
    assert error.column_name == "phone"
    assert await count(conn, "contacts") == 0


async def test_categories_templates_and_suppressions_name_the_field(
    conn: asyncpg.Connection,
) -> None:
    before = await count(conn, "categories")
    for sql, column, text in [
        (
            "INSERT INTO pgnotify.categories (name, default_preference) VALUES ('n', 'often')",
            "default_preference",
            "unknown default_preference 'often': use immediate, daily, weekly or off",
        ),
        (
            "INSERT INTO pgnotify.categories (name, channels) VALUES ('n', '{email,fax}')",
            "channels",
            "unknown channel 'fax' in category channels",
        ),
        (
            "INSERT INTO pgnotify.categories (name, critical, requires_consent) VALUES ('n', true, true)",
            "requires_consent",
            "cannot be both critical and requires_consent",
        ),
    ]:
        error = await refused(conn, sql)
        assert (error.column_name, error.table_name) == (column, "categories")
        assert text in error.message
    assert await count(conn, "categories") == before

    for sql, column, text in [
        (
            "INSERT INTO pgnotify.templates (key, channel, body) VALUES ('w', 'mail', 'x')",
            "channel",
            "unknown template channel 'mail': use email, sms, push, webhook or inapp",
        ),
        (
            "INSERT INTO pgnotify.templates (key, channel) VALUES ('w', 'email')",
            "body",
            "template 'w' has no subject, body or html_body",
        ),
        (
            "INSERT INTO pgnotify.templates (key, channel, body, version) VALUES ('w', 'email', 'x', 0)",
            "version",
            "template version must be 1 or more, not 0",
        ),
    ]:
        error = await refused(conn, sql)
        assert (error.column_name, error.table_name) == (column, "templates")
        assert text in error.message
    assert await count(conn, "templates") == 0
    # an upsert still works: uniqueness is left to the key
    upsert = (
        "INSERT INTO pgnotify.templates (key, channel, body) VALUES ('w', 'email', $1) "
        "ON CONFLICT (key, channel, locale, version) DO UPDATE SET body = EXCLUDED.body"
    )
    await conn.execute(upsert, "one")
    await conn.execute(upsert, "two")
    assert await conn.fetchval("SELECT body FROM pgnotify.templates") == "two"

    error = await refused(
        conn,
        "INSERT INTO pgnotify.suppressions (channel, address, reason, source) "
        "VALUES ('inapp', 'u', 'x', 'y')",
    )
    assert error.column_name == "channel" and "use email, sms, push or webhook" in error.message


async def test_an_email_notification_reads_an_email_notification(conn: asyncpg.Connection) -> None:
    error = await refused(conn, "SELECT pgnotify.enqueue('email', 'a@b.co')")
    assert error.message == "pgnotify: an email notification needs a template or a body"
    error = await refused(conn, "SELECT pgnotify.enqueue('push', 'token-1')")
    assert error.message == "pgnotify: a push notification needs a template or a body"


# --- the migration --------------------------------------------------------------------------------


async def test_replaced_functions_keep_security_definer_and_their_settings(
    conn: asyncpg.Connection,
) -> None:
    """Another migration may make producer functions SECURITY DEFINER with a fixed search_path;
    0008 replaces some of them and must give that back."""
    functions = ["pgnotify.enqueue", "pgnotify.notify_user"]
    for name in functions:
        await conn.execute(
            f"ALTER FUNCTION {name} SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp"
        )
    await conn.execute("DELETE FROM pgnotify.schema_migrations WHERE version = 8")
    await conn.execute(MIGRATION_8.read_text())  # applies again: every statement is re-runnable
    for name in functions:
        row = await conn.fetchrow(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE oid = $1::regproc", name
        )
        assert row["prosecdef"] is True, name
        assert row["proconfig"] == ["search_path=pg_catalog, pgnotify, pg_temp"], name
    assert await conn.fetchval("SHOW search_path") == '"$user", public'
    assert await conn.fetchval("SELECT max(version) FROM pgnotify.schema_migrations") == (
        SCHEMA_VERSION
    )
    # and the functions still work under their fixed search_path
    assert await conn.fetchval("SELECT pgnotify.enqueue('inapp', 'ada', body => 'x')") >= 1
