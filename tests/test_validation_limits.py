"""Migration 0006: what can never be sent, or never be read back, is refused at INSERT with a
field-named error (SQLSTATE 23514) and nothing is stored."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import asyncpg
import phonenumbers
import pytest

from pgnotify_worker.core import netguard

EMAIL = "channel => 'email', recipient => 'ada@example.com', subject => 'Hi'"


async def refused(
    conn: asyncpg.Connection, sql: str, column: str, message: str, *args: Any
) -> asyncpg.CheckViolationError:
    """Run `sql`, expect a 23514 naming `column`, and check no notification was stored."""
    before = await conn.fetchval("SELECT count(*) FROM pgnotify.notifications")
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute(sql, *args)
    error = caught.value
    assert error.sqlstate == "23514"
    assert error.column_name == column, str(error)
    assert message in str(error), str(error)
    assert str(error).startswith("pgnotify: ")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == before
    return error


# --- timestamps ----------------------------------------------------------------------------------

BAD_TIMES = [
    ("run_at", "'4713-01-01 BC'"),
    ("run_at", "'294276-12-31'"),
    ("run_at", "'10000-01-01'"),
    ("run_at", "'infinity'"),
    ("run_at", "'-infinity'"),
    ("run_at", "'1999-12-31 23:59:59+00'"),
    ("run_at", "now() + interval '10 years 1 day'"),
    ("expires_at", "'10000-01-01'"),
    ("expires_at", "'4713-01-01 BC'"),
    ("expires_at", "'infinity'"),
    ("expires_at", "'-infinity'"),
    ("expires_at", "now() + interval '11 years'"),
]


@pytest.mark.parametrize(("column", "value"), BAD_TIMES)
async def test_out_of_range_times_are_refused_on_plain_insert(
    conn: asyncpg.Connection, column: str, value: str
) -> None:
    await refused(
        conn,
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, "
        f"{column}) VALUES ('email', 'ada@example.com', 'Hi', 'x', ({value})::timestamptz)",
        column,
        f"{column} must be a finite time from 2000-01-01 to 10 years from now",
    )


@pytest.mark.parametrize(("column", "value"), BAD_TIMES)
async def test_out_of_range_times_are_refused_by_notify_user(
    conn: asyncpg.Connection, column: str, value: str
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('ada', 'ada@example.com')"
    )
    await refused(
        conn,
        f"SELECT pgnotify.notify_user('ada', 'billing', subject => 'Hi', body => 'x', "
        f"{column} => ({value})::timestamptz)",
        column,
        "must be a finite time",
    )


@pytest.mark.parametrize("value", ["'4713-01-01 BC'", "'294276-12-31'", "'-infinity'"])
async def test_out_of_range_run_at_is_refused_by_enqueue(
    conn: asyncpg.Connection, value: str
) -> None:
    await refused(
        conn,
        f"SELECT pgnotify.enqueue({EMAIL}, body => 'x', run_at => ({value})::timestamptz)",
        "run_at",
        "run_at must be a finite time",
    )


async def test_times_at_the_edges_are_accepted_and_decode(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        f"SELECT pgnotify.enqueue({EMAIL}, body => 'x', "
        "run_at => now() + interval '10 years' - interval '1 minute')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body, run_at, "
        "expires_at) VALUES ('email', 'ada@example.com', 'Hi', 'x', '2000-01-01 00:00:00+00', "
        "now() + interval '9 years')"
    )
    rows = await conn.fetch("SELECT run_at, expires_at, status FROM pgnotify.notifications")
    assert len(rows) == 2  # asyncpg decoded every timestamp
    assert (
        await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", nid)
    ) == ("scheduled")


async def test_an_update_to_an_out_of_range_time_is_refused(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(f"SELECT pgnotify.enqueue({EMAIL}, body => 'x')")
    for column in ("run_at", "expires_at"):
        with pytest.raises(asyncpg.CheckViolationError, match="must be a finite time") as caught:
            await conn.execute(
                f"UPDATE pgnotify.notifications SET {column} = 'infinity' WHERE id = $1", nid
            )
        assert caught.value.column_name == column
    assert await conn.fetchval(
        "SELECT run_at < now() + interval '1 minute' AND expires_at IS NULL "
        "FROM pgnotify.notifications WHERE id = $1",
        nid,
    )


OTHER_TABLES = [
    (
        "INSERT INTO pgnotify.contacts (user_id, email, unsubscribed_at) "
        "VALUES ('u', 'u@example.com', '10000-01-01')",
        "contacts",
        "unsubscribed_at",
    ),
    (
        "INSERT INTO pgnotify.devices (user_id, platform, token, last_seen_at) "
        "VALUES ('u', 'ios', 'tok', '4713-01-01 BC')",
        "devices",
        "last_seen_at",
    ),
    (
        "INSERT INTO pgnotify.consents (user_id, category, granted, source, recorded_at) "
        "VALUES ('u', 'marketing', true, 'test', 'infinity')",
        "consents",
        "recorded_at",
    ),
    (
        "UPDATE pgnotify.jobs SET next_run_at = '294276-12-31' WHERE name = 'retention'",
        "jobs",
        "next_run_at",
    ),
]


@pytest.mark.parametrize(("sql", "table", "column"), OTHER_TABLES)
async def test_out_of_range_times_in_other_tables_are_refused(
    conn: asyncpg.Connection, sql: str, table: str, column: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="must be a finite time") as caught:
        await conn.execute(sql)
    assert (caught.value.table_name, caught.value.column_name) == (table, column)


async def test_an_out_of_range_chat_message_time_is_refused(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.chat_rooms (id, organization_id, name) VALUES ('r', 'o', 'Room')"
    )
    with pytest.raises(asyncpg.CheckViolationError, match="created_at must be a finite time"):
        await conn.execute(
            "INSERT INTO pgnotify.chat_messages (room_id, author_id, body, created_at) "
            "VALUES ('r', 'a', 'hi', '-infinity')"
        )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.chat_messages") == 0


# --- sizes ---------------------------------------------------------------------------------------

TOO_BIG = [
    ("body", "email", {"body": "x" * 10_000_000}, "over the 262144 byte limit"),
    ("html_body", "email", {"body": "x", "html_body": "<p>" * 5_000_000}, "1048576 byte limit"),
    ("subject", "email", {"body": "x", "subject": "s" * 1_000_000}, "over the 998 limit"),
    ("subject", "email", {"body": "x", "subject": "s" * 999}, "over the 998 limit"),
    ("user_id", "email", {"body": "x", "user_id": "u" * 10_000}, "over the 256 limit"),
    ("recipient", "email", {"body": "x", "recipient": "a" * 100_000 + "@b.co"}, "16384 limit"),
    ("recipient", "email", {"body": "x", "recipient": "a" * 250 + "@b.co"}, "not a valid email"),
    ("template", "email", {"template": "t" * 10_000}, "longer than 255"),
    ("category", "email", {"body": "x", "category": "c" * 101}, "longer than 100"),
    ("locale", "email", {"body": "x", "locale": "en" + "-abcd" * 300}, "longer than 35"),
    ("idempotency_key", "email", {"body": "x", "idempotency_key": "k" * 256}, "1 to 255"),
    ("body", "sms", {"body": "é" * 1601, "recipient": "+14155550123"}, "over the 1600"),
    ("body", "push", {"body": "x" * 4097, "recipient": "device-token"}, "over the 4096"),
]


def _args(channel: str, values: dict[str, str]) -> tuple[str, list[str]]:
    values = {"recipient": "ada@example.com", "subject": "Hi", **values}
    if channel != "email":
        values.pop("subject")
    names = list(values)
    sql = ", ".join(f"{name} => ${i + 2}" for i, name in enumerate(names))
    return f"SELECT pgnotify.enqueue($1, {sql})", [channel, *(values[n] for n in names)]


@pytest.mark.parametrize(("column", "channel", "values", "message"), TOO_BIG)
async def test_oversized_fields_are_refused(
    conn: asyncpg.Connection, column: str, channel: str, values: dict[str, str], message: str
) -> None:
    sql, args = _args(channel, values)
    await refused(conn, sql, column, message, *args)


FITS = [
    ("email", {"body": "x" * 262_144, "html_body": "y" * 1_048_576, "subject": "s" * 998}),
    ("email", {"body": "x", "user_id": "u" * 256, "locale": "zh-Hant-TW"}),
    ("sms", {"body": "é" * 1600, "recipient": "+14155550123"}),
    ("push", {"body": "x" * 4096, "recipient": "device-token"}),
    ("webhook", {"recipient": "https://example.com/" + "p" * 2000}),
]


@pytest.mark.parametrize(("channel", "values"), FITS)
async def test_fields_at_their_limit_are_accepted(
    conn: asyncpg.Connection, channel: str, values: dict[str, str]
) -> None:
    sql, args = _args(channel, values)
    await conn.execute(sql, *args)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 1


async def test_an_email_needs_a_subject_or_a_template(conn: asyncpg.Connection) -> None:
    await refused(
        conn,
        "SELECT pgnotify.enqueue('email', 'ada@example.com', body => 'x')",
        "subject",
        "an email needs a subject",
    )
    await refused(
        conn,
        "INSERT INTO pgnotify.notifications (channel, recipient, html_body) "
        "VALUES ('email', 'ada@example.com', '<p>x</p>')",
        "subject",
        "an email needs a subject",
    )
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) "
        "VALUES ('welcome', 'email', 'Welcome', 'Hello')"
    )
    await conn.execute("SELECT pgnotify.enqueue('email', 'ada@example.com', template => 'welcome')")
    await conn.execute("SELECT pgnotify.enqueue('sms', '+14155550123', body => 'no subject')")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 2


async def test_notify_user_leaves_out_an_email_without_subject(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('ada', 'ada@example.com')"
    )
    ids = await conn.fetchval(
        "SELECT pgnotify.notify_user('ada', 'billing', body => 'x', channels => '{email,inapp}')"
    )
    channels = await conn.fetch(
        "SELECT channel FROM pgnotify.notifications WHERE id = ANY($1)", ids
    )
    assert [r["channel"] for r in channels] == ["inapp"]


# --- phone numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("+999999999999999", "no country calling code 999 is assigned"),
        ("+0123456789", "no country calling code 012 is assigned"),
        ("+2891234567", "no country calling code 289 is assigned"),
        ("+123456", "fewer than 7 digits"),
        ("+1415555012345678", "not a valid phone number"),  # 16 digits
    ],
)
async def test_an_e164_number_needs_an_assigned_country_code(
    conn: asyncpg.Connection, number: str, message: str
) -> None:
    await refused(
        conn,
        "SELECT pgnotify.enqueue('sms', $1, body => 'x')",
        "recipient",
        message,
        number,
    )


@pytest.mark.parametrize(
    "number",
    ["+14155550123", "+44 20 7946 0958", "+683 4002", "+86 138 0013 8000", "(415) 555-2671"],
)
async def test_real_numbers_and_national_forms_are_accepted(
    conn: asyncpg.Connection, number: str
) -> None:
    await conn.execute("SELECT pgnotify.enqueue('sms', $1, body => 'x')", number)


async def test_the_country_code_table_is_the_one_the_worker_sends_with(
    conn: asyncpg.Connection,
) -> None:
    known = {str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE}
    rows = await conn.fetch(
        "SELECT p, pgnotify.e164_country_code_length(p) AS n "
        "FROM (SELECT lpad(g::text, 3, '0') AS p FROM generate_series(0, 999) g) x"
    )
    for row in rows:
        prefix, length = row["p"], row["n"]
        expected = next((n for n in (1, 2, 3) if prefix[:n] in known), 0)
        assert length == expected, prefix
    assert set(await conn.fetchval("SELECT pgnotify.e164_country_codes()")) == known


# --- webhook hosts written as numbers ------------------------------------------------------------

# The numeric forms of /work/shared/reference/ssrf-corpus.txt (and a few more): each names a
# loopback, private, link-local, reserved or metadata address, refused at INSERT.
NUMERIC_TARGETS = [
    ("http://127.0.0.1:18090/a", "127.0.0.1", "loopback"),
    ("http://[::1]:18090/b", "::1", "loopback"),
    ("http://[::ffff:127.0.0.1]:18090/c", "127.0.0.1", "loopback"),
    ("http://[::ffff:7f00:1]:18090/c2", "127.0.0.1", "loopback"),
    ("http://0x7f000001:18090/d", "127.0.0.1", "loopback"),
    ("http://2130706433:18090/e", "127.0.0.1", "loopback"),
    ("http://0177.0.0.1:18090/f", "127.0.0.1", "loopback"),
    ("http://017700000001:18090/f2", "127.0.0.1", "loopback"),
    ("http://127.1:18090/g", "127.0.0.1", "loopback"),
    ("http://0x7f.1:18090/g2", "127.0.0.1", "loopback"),
    ("http://0:18090/h", "0.0.0.0", "unspecified"),
    ("http://0.0.0.0:18090/i", "0.0.0.0", "unspecified"),
    ("http://[::]:18090/j", "::", "unspecified"),
    ("http://10.1.2.3:18090/m", "10.1.2.3", "private"),
    ("http://192.0.2.2:18090/o", "192.0.2.2", "reserved"),
    ("http://[fd00::2]:18090/p", "fd00::2", "private"),
    ("http://[fe80::1]:18090/p2", "fe80::1", "link-local"),
    ("http://100.64.0.1:18090/q", "100.64.0.1", "carrier-grade NAT"),
    ("http://127.0.0.1:5432/r", "127.0.0.1", "loopback"),
    ("http://0251.0376.0251.0376/latest/meta-data/", "169.254.169.254", "cloud metadata"),
    ("http://2852039166/latest/meta-data/", "169.254.169.254", "cloud metadata"),
    ("http://0xa9fea9fe/latest/meta-data/", "169.254.169.254", "cloud metadata"),
    ("http://0XA9FEA9FE/", "169.254.169.254", "cloud metadata"),
    ("http://169.254.43518/", "169.254.169.254", "cloud metadata"),
    ("http://[::ffff:169.254.169.254]/latest/meta-data/", "169.254.169.254", "cloud metadata"),
    ("http://[::ffff:a9fe:a9fe]/latest/meta-data/", "169.254.169.254", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254", "cloud metadata"),
    (
        "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:18090/u",
        "127.0.0.1",
        "loopback",
    ),  # full-width
    ("http://[::127.0.0.1]:18090/w", "127.0.0.1", "loopback"),
    ("http://[0:0:0:0:0:ffff:127.0.0.1]:18090/x", "127.0.0.1", "loopback"),
    ("http://[::1%25lo]:18090/zz", "::1", "loopback"),
    ("http://127.0.0.1.:18090/", "127.0.0.1", "loopback"),
    ("https://192.168.1.10/hook", "192.168.1.10", "private"),
    ("https://172.31.255.255/hook", "172.31.255.255", "private"),
    ("https://0300.0250.1.1/hook", "192.168.1.1", "private"),
    ("https://224.0.0.1/hook", "224.0.0.1", "multicast"),
    ("https://255.255.255.255/hook", "255.255.255.255", "reserved"),
]


@pytest.mark.parametrize(("url", "address", "reason"), NUMERIC_TARGETS)
async def test_numeric_webhook_hosts_in_blocked_ranges_are_refused(
    conn: asyncpg.Connection, url: str, address: str, reason: str
) -> None:
    await conn.execute(
        "SET pgnotify.webhook_allowed_networks = ''"
    )  # the test database allows 127/8
    await refused(
        conn,
        "SELECT pgnotify.enqueue('webhook', $1)",
        "recipient",
        "metadata" if reason == "cloud metadata" else f"a {reason} address ({address})",
        url,
    )
    await refused(
        conn,
        "INSERT INTO pgnotify.notifications (channel, recipient) VALUES ('webhook', $1)",
        "recipient",
        "metadata" if reason == "cloud metadata" else reason,
        url,
    )


@pytest.mark.parametrize(("url", "address", "reason"), NUMERIC_TARGETS)
async def test_the_insert_check_agrees_with_the_send_time_guard(
    conn: asyncpg.Connection, url: str, address: str, reason: str
) -> None:
    host = url.split("://", 1)[1].split("/", 1)[0]
    host = host.split("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
    found = await conn.fetchval("SELECT host(pgnotify.webhook_address($1))", host)
    assert found == address
    assert netguard.blocked_reason(address) is not None
    plain = host.rstrip(".")
    if plain.isascii() and not plain.startswith("["):
        # what the resolver makes of it: inet_aton() reads every IPv4 spelling
        assert str(ipaddress.ip_address(socket.inet_aton(plain))) == address


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:18090/k",  # names are judged at send time, after resolving
        "http://LOCALHOST.:18090/k2",
        "http://ssrf-loop.rt-test:18090/l",
        "http://127.0.0.1.nip.io:18090/v",
        "http://example.com#@127.0.0.1:18090/z",
        "https://dead.beef.example/hook",
        "https://1password.com/hook",
        "https://8.8.8.8/hook",
        "https://134744072/hook",  # 8.8.8.8, public
        "https://[2606:4700:4700::1111]/hook",
        "https://1.2.3.4.5/hook",  # not an address: a name that will not resolve
    ],
)
async def test_names_and_public_addresses_are_accepted(conn: asyncpg.Connection, url: str) -> None:
    await conn.execute("SET pgnotify.webhook_allowed_networks = ''")
    await conn.execute("SELECT pgnotify.enqueue('webhook', $1)", url)


async def test_credentials_in_the_authority_are_refused(conn: asyncpg.Connection) -> None:
    await refused(
        conn,
        "SELECT pgnotify.enqueue('webhook', $1)",
        "recipient",
        "credentials",
        "http://127.0.0.1:18090\\@example.com/y",
    )


async def test_allowed_networks_let_an_internal_receiver_in_but_never_metadata(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute("SET pgnotify.webhook_allowed_networks = '127.0.0.0/8, 10.0.0.0/8'")
    for url in ("http://127.0.0.1:18090/a", "http://127.1/g", "http://10.1.2.3/m"):
        await conn.execute("SELECT pgnotify.enqueue('webhook', $1)", url)
    await refused(
        conn,
        "SELECT pgnotify.enqueue('webhook', $1)",
        "recipient",
        "private",
        "http://192.168.0.1/",
    )
    await conn.execute("SET pgnotify.webhook_allowed_networks = '0.0.0.0/0'")
    await refused(
        conn,
        "SELECT pgnotify.enqueue('webhook', $1)",
        "recipient",
        "metadata",
        "http://2852039166/latest/meta-data/",
    )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 3


async def test_the_migration_fails_pending_rows_with_out_of_range_times(empty_dsn: str) -> None:
    from pgnotify_worker.adapters import migrate

    conn = await asyncpg.connect(empty_dsn)
    try:
        await migrate.migrate(conn, migrate.load_migrations()[:5])
        await conn.execute(
            "INSERT INTO pgnotify.notifications (channel, recipient, body, run_at, expires_at) "
            "VALUES ('sms', '+14155550123', 'bc', '4713-01-01 BC', NULL), "
            "       ('sms', '+14155550123', 'far', '294276-12-31', NULL), "
            "       ('sms', '+14155550123', 'exp', now(), '10000-01-01'), "
            "       ('sms', '+14155550123', 'ok', now(), now() + interval '1 day')"
        )
        await migrate.migrate(conn)
        rows = await conn.fetch(
            "SELECT body, status, last_error, expires_at IS NULL AS no_expiry "
            "FROM pgnotify.notifications ORDER BY id"
        )  # every time decodes now
        assert [(r["body"], r["status"]) for r in rows] == [
            ("bc", "failed"),
            ("far", "failed"),
            ("exp", "failed"),
            ("ok", "queued"),
        ]
        assert "run_at was out of range" in rows[0]["last_error"]
        assert "expires_at was out of range" in rows[2]["last_error"] and rows[2]["no_expiry"]
        events = await conn.fetchval(
            "SELECT count(*) FROM pgnotify.events WHERE error_code = 'time_out_of_range'"
        )
        assert events == 3
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("phone", "+999999999999999", "not a valid E.164 phone number"),
        ("email", "a" * 250 + "@b.co", "not a valid email address"),
        ("webhook_url", "http://0xa9fea9fe/latest/meta-data/", "cloud metadata"),
        ("webhook_url", "http://10.1.2.3/hook", "a private address"),
    ],
)
async def test_contacts_refuse_what_notify_user_could_not_send(
    conn: asyncpg.Connection, column: str, value: str, message: str
) -> None:
    await conn.execute("SET pgnotify.webhook_allowed_networks = ''")
    with pytest.raises(asyncpg.CheckViolationError, match=message) as caught:
        await conn.execute(
            f"INSERT INTO pgnotify.contacts (user_id, {column}) VALUES ('ada', $1)", value
        )
    assert (caught.value.table_name, caught.value.column_name) == ("contacts", column)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.contacts") == 0
