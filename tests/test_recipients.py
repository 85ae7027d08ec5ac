"""Recipients, preferences, consent, quiet hours, suppression, unsubscribe links, expiry, digests,
chat fan-out, periodic jobs, retention and the monitoring views: against the real database and
the running worker. Time is driven through the database clock (explicit `at`), never by sleeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters.jobs import JobRunner
from pgnotify_worker.config import Settings
from pgnotify_worker.core.unsubscribe import make_token
from tests.fakes.smtp import FakeSMTP
from tests.support.db import wait_rows
from tests.support.worker import running

DONE = {"sent", "failed", "dead", "skipped", "expired", "held", "scheduled"}
UNSUB_KEY = "unsubscribe-secret-0123456789abcdef"


async def events(conn: asyncpg.Connection, nid: int) -> list[tuple[str, str | None]]:
    rows = await conn.fetch(
        "SELECT event, error_code FROM pgnotify.processing_timeline WHERE notification_id = $1 "
        "AND event <> 'queued' ORDER BY at, seq",
        nid,
    )
    return [(r["event"], r["error_code"]) for r in rows]


@pytest.fixture
def sink_settings(
    worker_settings: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Settings]:
    """Every channel to the file sink, so what would be sent can be read back."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "email_providers": "file",
            "sms_providers": "file",
            "push_providers": "file",
            "inapp_providers": "file",
            "file_sink_path": str(tmp_path / "outbox.jsonl"),
        }
        values.update(overrides)
        return worker_settings(**values)

    return make


def outbox(settings: Settings) -> list[dict[str, object]]:
    path = Path(settings.file_sink_path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- notify_user --------------------------------------------------------------------------------


async def test_notify_user_creates_one_row_per_reachable_channel(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, phone, locale) VALUES ('ada', 'ada@example.com', '+14155550123', 'fr')"
    )
    await conn.execute("SELECT pgnotify.register_device('ada', 'android', 'fcm-token-1')")
    await conn.execute("SELECT pgnotify.set_preference('ada', 'off', 'sms', 'billing')")
    ids = await conn.fetchval(
        "SELECT pgnotify.notify_user('ada', 'billing', subject => 'Invoice', body => 'Invoice {{ n }}', payload => '{\"n\": 7}')"
    )
    rows = await conn.fetch(
        "SELECT * FROM pgnotify.notifications WHERE id = ANY($1) ORDER BY channel", ids
    )
    assert [(r["channel"], r["recipient"]) for r in rows] == [
        ("email", "ada@example.com"),
        ("inapp", "ada"),
        ("push", "user:ada"),
    ]  # sms: turned off for billing
    assert len({r["group_id"] for r in rows}) == 1 and rows[0]["group_id"] is not None
    assert {r["locale"] for r in rows} == {"fr"}


async def test_notify_user_skips_channels_without_an_address_or_a_template(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('bob', 'bob@example.com')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES ('welcome', 'email', 'Hi', 'Welcome')"
    )
    ids = await conn.fetchval("SELECT pgnotify.notify_user('bob', NULL, template => 'welcome')")
    channels = await conn.fetch(
        "SELECT channel FROM pgnotify.notifications WHERE id = ANY($1)", ids
    )
    assert [r["channel"] for r in channels] == [
        "email"
    ]  # no phone, no device; inapp has no template
    # no channel at all: refused (schema 0008), where it used to be a silent []
    with pytest.raises(asyncpg.CheckViolationError, match="template 'welcome' exists for email"):
        await conn.fetchval("SELECT pgnotify.notify_user('nobody', NULL, template => 'welcome')")


async def test_preference_precedence(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.categories (name, default_preference) VALUES ('news', 'weekly')"
    )
    assert (
        await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'news')") == "weekly"
    )  # default
    assert (
        await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'other')") == "immediate"
    )
    await conn.execute("SELECT pgnotify.set_preference('u', 'daily')")  # any channel, any category
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'news')") == "daily"
    await conn.execute("SELECT pgnotify.set_preference('u', 'off', 'email')")  # email, any category
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'news')") == "off"
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'sms', 'news')") == "daily"
    await conn.execute(
        "SELECT pgnotify.set_preference('u', 'immediate', '*', 'news')"
    )  # any channel, news
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'news')") == "immediate"
    await conn.execute(
        "SELECT pgnotify.set_preference('u', 'weekly', 'email', 'news')"
    )  # the most specific
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'email', 'news')") == "weekly"
    assert await conn.fetchval("SELECT pgnotify.preference_of('u', 'push', 'news')") == "immediate"


# --- send-time rules ------------------------------------------------------------------------------


async def test_a_preference_changed_after_enqueue_still_holds(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('eve', 'eve@example.com')"
    )
    ids = await conn.fetchval(
        "SELECT pgnotify.notify_user('eve', 'billing', subject => 'Hi', body => 'x', channels => '{email}')"
    )
    await conn.execute("SELECT pgnotify.set_preference('eve', 'off', '*', 'billing')")
    async with running(sink_settings()) as service:
        rows = await wait_rows(conn, ids, DONE, service)
    assert rows[0]["status"] == "skipped"
    assert await events(conn, ids[0]) == [("claimed", None), ("skipped", "preference_off")]


async def test_critical_categories_bypass_opt_outs_but_not_suppression(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, unsubscribed_at, quiet_start, quiet_end) "
        "VALUES ('joe', 'joe@example.com', now(), '00:00', '23:59:59')"
    )
    await conn.execute("SELECT pgnotify.set_preference('joe', 'off')")
    reset = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'joe@example.com', subject => 'Hi', body => 'Your code is 4711', user_id => 'joe', category => 'security')"
    )
    news = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'joe@example.com', subject => 'Hi', body => 'news', user_id => 'joe', category => 'billing')"
    )
    settings = sink_settings()
    async with running(settings) as service:
        rows = await wait_rows(conn, [reset, news], DONE, service)
        await conn.execute(
            "INSERT INTO pgnotify.suppressions (channel, address, reason, source) VALUES ('email', 'joe@example.com', 'hard_bounce', 'test')"
        )
        again = await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'JOE@example.com', subject => 'Hi', body => 'code 2', user_id => 'joe', category => 'security')"
        )
        blocked = await wait_rows(conn, [again], DONE, service)
    assert [r["status"] for r in rows] == ["sent", "skipped"]
    assert blocked[0]["status"] == "skipped"
    assert ("skipped", "suppressed") in await events(conn, again)
    assert [m["text"] for m in outbox(settings)] == ["Your code is 4711"]


async def test_marketing_needs_a_recorded_opt_in(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    sql = "SELECT pgnotify.enqueue('email', 'mia@example.com', subject => 'Hi', body => 'Sale', user_id => 'mia', category => 'marketing')"
    first = await conn.fetchval(sql)
    settings = sink_settings()
    async with running(settings) as service:
        await wait_rows(conn, [first], DONE, service)
        await conn.execute(
            "SELECT pgnotify.record_consent('mia', 'marketing', true, 'signup form')"
        )
        second = await conn.fetchval(sql)
        rows = await wait_rows(conn, [first, second], DONE, service)
    assert [r["status"] for r in rows] == ["skipped", "sent"]
    assert ("skipped", "no_consent") in await events(conn, first)
    history = await conn.fetch(
        "SELECT granted, source FROM pgnotify.consent_history WHERE user_id = 'mia'"
    )
    assert [(h["granted"], h["source"]) for h in history] == [(True, "signup form")]


async def test_quiet_hours_defer_to_the_end_of_the_window_without_spending_an_attempt(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    # a window from one hour ago to one hour ahead, on the contact's own clock
    await conn.execute(
        """
        INSERT INTO pgnotify.contacts (user_id, email, timezone, quiet_start, quiet_end)
        SELECT 'kim', 'kim@example.com', 'Asia/Tokyo',
               (now() AT TIME ZONE 'Asia/Tokyo')::time - interval '1 hour',
               (now() AT TIME ZONE 'Asia/Tokyo')::time + interval '1 hour'
        """
    )
    quiet = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'kim@example.com', subject => 'Hi', body => 'later', user_id => 'kim', category => 'billing')"
    )
    urgent = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'kim@example.com', subject => 'Hi', body => 'now', user_id => 'kim', category => 'security')"
    )
    async with running(sink_settings()) as service:
        rows = await wait_rows(conn, [quiet, urgent], {"scheduled", "sent"}, service)
    deferred, sent = rows
    assert (deferred["status"], deferred["attempts"], sent["status"]) == ("scheduled", 0, "sent")
    wait = await conn.fetchval(
        "SELECT extract(epoch FROM run_at - now()) FROM pgnotify.notifications WHERE id = $1", quiet
    )
    assert 3500 < wait <= 3600  # the end of the window, not a retry back-off
    assert await events(conn, quiet) == [("claimed", None), ("deferred", "quiet_hours")]


async def test_expired_notifications_are_never_sent(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.categories (name, ttl) VALUES ('otp', interval '1 millisecond')"
    )
    stale = await conn.fetchval(
        "SELECT pgnotify.enqueue('sms', '+14155550123', body => 'code 1234', category => 'otp')"
    )
    assert await conn.fetchval(
        "SELECT expires_at IS NOT NULL FROM pgnotify.notifications WHERE id = $1", stale
    )
    await conn.execute(
        "SELECT pg_sleep(0.01)"
    )  # past its one-millisecond life, on the server clock
    settings = sink_settings()
    async with running(settings) as service:
        rows = await wait_rows(conn, [stale], DONE, service)
    assert rows[0]["status"] == "expired"
    assert ("expired", "expired") in await events(conn, stale)
    assert outbox(settings) == []


# --- unsubscribe links ----------------------------------------------------------------------------


async def opt_outs(conn: asyncpg.Connection, user: str) -> tuple[list[tuple[str, ...]], bool]:
    """(preference rows, globally unsubscribed?) of a user."""
    prefs = await conn.fetch(
        "SELECT channel, category, setting, source FROM pgnotify.preferences WHERE user_id = $1",
        user,
    )
    everything = await conn.fetchval(
        "SELECT unsubscribed_at IS NOT NULL FROM pgnotify.contacts WHERE user_id = $1", user
    )
    return [tuple(p) for p in prefs], bool(everything)


def assert_safe_page(response: aiohttp.ClientResponse) -> None:
    headers = response.headers
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp and "form-action 'self'" in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"


async def test_unsubscribe_links_in_templates_and_headers_and_the_pages(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ann@example.com', subject => 'Hi', body => 'Bye: {{ unsubscribe_url }}', user_id => 'ann', category => 'news')"
    )
    settings = sink_settings(
        unsubscribe_secret=UNSUB_KEY, public_base_url="https://notify.example.com"
    )
    async with running(settings) as service:
        await wait_rows(conn, [nid], DONE, service)
        (message,) = outbox(settings)
        url = str(message["unsubscribe_url"])
        assert url.startswith("https://notify.example.com/unsubscribe?token=u1.")
        assert message["text"] == f"Bye: {url}"
        token = url.split("token=", 1)[1]
        base = f"http://127.0.0.1:{service.http_port}/unsubscribe"
        one_click = {"List-Unsubscribe": "One-Click"}
        async with aiohttp.ClientSession() as http:
            # GET (a person, a link scanner, a prefetch) shows the confirm form, changes nothing
            shown = await http.get(base, params={"token": token})
            page = await shown.text()
            assert shown.status == 200 and "Unsubscribe from news notifications?" in page
            assert '<form method="post" action="?token=' + token + '"' in page
            assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
            assert_safe_page(shown)
            assert (await http.get(base, params={"token": token})).status == 200
            head = await http.head(base, params={"token": token})
            assert head.status == 200
            assert await opt_outs(conn, "ann") == ([], False)
            # a broken link: 400 and nothing changes (GET and POST)
            tampered = await http.get(base, params={"token": token[:-3] + "AAA"})
            assert tampered.status == 400 and "Nothing was changed" in await tampered.text()
            assert_safe_page(tampered)
            expired = make_token(UNSUB_KEY.encode(), "ann", "billing", expires=1)
            old = await http.get(base, params={"token": expired})
            assert old.status == 400 and "expired" in await old.text()
            forged = await http.post(base, params={"token": expired}, data=one_click)
            assert forged.status == 400
            # a POST without the RFC 8058 field records nothing
            bare = await http.post(base, params={"token": token}, data={"other": "x"})
            assert bare.status == 400
            assert await opt_outs(conn, "ann") == ([], False)
            # the one-click POST (and the page's form, which sends the same) records it, twice ok
            done = await http.post(base, params={"token": token}, data=one_click)
            assert done.status == 200 and "You are unsubscribed" in await done.text()
            assert_safe_page(done)
            multipart = aiohttp.FormData(
                {"List-Unsubscribe": "One-Click"}, default_to_multipart=True
            )
            again = await http.post(base, params={"token": token}, data=multipart)
            assert again.status == 200  # idempotent; RFC 8058 prefers multipart/form-data
            assert await opt_outs(conn, "ann") == (
                [("*", "news", "off", "unsubscribe_link")],
                False,
            )
            # everything: the page says critical messages still come; POST records it
            everything = make_token(UNSUB_KEY.encode(), "ann", None, expires=2_000_000_000)
            shown = await http.get(base, params={"token": everything})
            assert "Unsubscribe from all notifications?" in await shown.text()
            assert "security alerts, are still sent" in await shown.text()
            assert await opt_outs(conn, "ann") == (
                [("*", "news", "off", "unsubscribe_link")],
                False,
            )
            assert (
                await http.post(base, params={"token": everything}, data=one_click)
            ).status == 200
            # a critical category (a link made before it became critical): never claims to stop it
            critical = make_token(UNSUB_KEY.encode(), "ann", "security", expires=2_000_000_000)
            shown = await http.get(base, params={"token": critical})
            text = await shown.text()
            assert shown.status == 200 and "cannot be turned off" in text
            assert "<form" not in text and "unsubscribed" not in text.lower()
            posted = await http.post(base, params={"token": critical}, data=one_click)
            assert posted.status == 200 and "cannot be turned off" in await posted.text()
    prefs, everything_off = await opt_outs(conn, "ann")
    assert prefs == [("*", "news", "off", "unsubscribe_link")]  # billing and security untouched
    assert everything_off


async def test_the_unsubscribe_page_escapes_what_it_shows(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    settings = sink_settings(unsubscribe_secret=UNSUB_KEY)
    category = '<script>alert("x")</script>'
    token = make_token(UNSUB_KEY.encode(), "eve", category, expires=2_000_000_000)
    async with running(settings) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/unsubscribe"
        shown = await http.get(base, params={"token": token})
        page = await shown.text()
        bad = await http.get(base, params={"token": "<b>" + token})
        bad_page = await bad.text()
    assert shown.status == 200 and "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert bad.status == 400 and "<b>" not in bad_page
    assert await opt_outs(conn, "eve") == ([], False)


async def test_critical_categories_get_no_unsubscribe_link_or_header(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> None:
    sql = (
        "SELECT pgnotify.enqueue('email', 'bo@example.com', subject => $1, "
        "body => 'Unsubscribe: [{{ unsubscribe_url }}]', user_id => 'bo', category => $1, "
        "payload => $2)"
    )
    async with FakeSMTP() as smtp:
        settings = worker_settings(
            email_providers="smtp",
            smtp_host=smtp.host,
            smtp_port=smtp.port,
            smtp_security="none",
            email_from="Acme <no-reply@acme.test>",
            unsubscribe_secret=UNSUB_KEY,
            public_base_url="https://notify.example.com",
        )
        news = await conn.fetchval(sql, "news", {})
        # a producer's own link is dropped for a critical category too
        reset = await conn.fetchval(sql, "security", {"unsubscribe_url": "https://app.example/u"})
        async with running(settings) as service:
            rows = await wait_rows(conn, [news, reset], DONE, service)
        mails = {m.message["Subject"]: m.message for m in await smtp.wait_for(2)}
    assert [r["status"] for r in rows] == ["sent", "sent"]
    news_mail, reset_mail = mails["news"], mails["security"]
    assert news_mail["List-Unsubscribe"].startswith("<https://notify.example.com/unsubscribe?")
    assert news_mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "Unsubscribe: [https://notify.example.com/unsubscribe?token=u1." in str(
        news_mail.get_content()
    )
    assert reset_mail["List-Unsubscribe"] is None and reset_mail["List-Unsubscribe-Post"] is None
    assert "Unsubscribe: []" in str(reset_mail.get_content())


# --- digests --------------------------------------------------------------------------------------


async def test_daily_digest_at_the_users_local_eight(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, timezone) VALUES ('pia', 'pia@example.com', 'Europe/Paris')"
    )
    await conn.execute("SELECT pgnotify.set_preference('pia', 'daily', 'email')")
    ids = [
        await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'pia@example.com', subject => $1, body => 'x', user_id => 'pia', category => 'billing')",
            subject,
        )
        for subject in ("first", "second", "withdrawn")
    ]
    settings = sink_settings(jobs=False)
    async with running(settings) as service:
        held = await wait_rows(conn, ids, {"held"}, service)
        assert {(r["hold"], r["attempts"]) for r in held} == {("daily", 0)}
        assert await conn.fetchval("SELECT pgnotify.cancel($1)", ids[2]) is True  # left out
        # the next 08:00 in Paris after the rows were held: a minute before it, nothing; at it, the
        # digest; a little later, nothing new (an empty period sends nothing)
        build = """
            WITH l AS (SELECT now() AT TIME ZONE 'Europe/Paris' AS t)
            SELECT pgnotify.build_digests('daily', (
                CASE WHEN t < date_trunc('day', t) + interval '8 hours' THEN date_trunc('day', t)
                     ELSE date_trunc('day', t) + interval '1 day' END
                + interval '8 hours' + $1::text::interval) AT TIME ZONE 'Europe/Paris') FROM l
        """
        assert await conn.fetchval(build, "-1 minute") == 0
        assert await conn.fetchval(build, "0") == 1
        assert await conn.fetchval(build, "5 minutes") == 0
        digest = await conn.fetchrow(
            "SELECT * FROM pgnotify.notifications WHERE digest_of = 'daily'"
        )
        await wait_rows(conn, [digest["id"]], {"sent"}, service)
    items = digest["payload"]["items"]
    assert [i["subject"] for i in items] == ["first", "second"]
    rows = await conn.fetch(
        "SELECT status, digest_id FROM pgnotify.notifications WHERE id = ANY($1) ORDER BY id", ids
    )
    assert [tuple(r) for r in rows] == [
        ("digested", digest["id"]),
        ("digested", digest["id"]),
        ("cancelled", None),
    ]
    sent = outbox(settings)
    assert len(sent) == 1 and sent[0]["subject"] == "Your 2 updates"
    assert sent[0]["text"] == "- first\n- second\n"


# --- chat fan-out ---------------------------------------------------------------------------------


async def test_a_chat_message_notifies_the_room_except_its_author_and_who_muted_it(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """
        INSERT INTO pgnotify.chat_rooms (id, organization_id, name, notify_organization)
            VALUES ('general', 'acme', 'General', true), ('dev', 'acme', 'Dev', false);
        INSERT INTO pgnotify.chat_room_members (room_id, user_id, muted) VALUES
            ('general', 'author', false), ('general', 'bea', false), ('general', 'cy', true),
            ('general', 'dan', false), ('dev', 'bea', false), ('dev', 'author', false);
        INSERT INTO pgnotify.chat_organization_members (organization_id, user_id) VALUES
            ('acme', 'eli'), ('acme', 'cy'), ('acme', 'author');
        INSERT INTO pgnotify.contacts (user_id, email) VALUES ('bea', 'bea@example.com'), ('eli', 'eli@example.com');
        SELECT pgnotify.set_preference('dan', 'off', '*', 'chat');
        """
    )
    listener = await asyncpg.connect(dsn)
    woken: list[str] = []
    await listener.add_listener("pgnotify", lambda *a: woken.append(a[3]))
    try:
        await conn.execute(
            "INSERT INTO pgnotify.chat_messages (room_id, author_id, body) VALUES "
            "('general', 'author', 'hello'), ('general', 'author', 'again'), ('dev', 'author', 'psst')"
        )
        await listener.execute("SELECT 1")
        await conn.execute("SELECT 1")
        await listener.execute("SELECT 1")
    finally:
        await listener.close()
    rows = await conn.fetch(
        "SELECT user_id, channel, payload->>'body' AS body FROM pgnotify.notifications ORDER BY 3, 1, 2"
    )
    got = {(r["body"], r["user_id"], r["channel"]) for r in rows}
    expected = {
        (body, user, channel)
        for body in ("hello", "again")
        for user, channels in (("bea", ("inapp", "email")), ("eli", ("inapp", "email")))
        for channel in channels
    } | {("psst", "bea", "inapp"), ("psst", "bea", "email")}
    assert got == expected  # not the author, not cy (muted), not dan (off), eli via the org
    assert sorted(woken) == ["email", "inapp"]  # one NOTIFY per channel for the whole statement


# --- periodic jobs ------------------------------------------------------------------------------


async def test_a_due_job_runs_once_across_three_workers(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.jobs (name, schedule, command, next_run_at) VALUES ('answer', '*/5 * * * *', 'SELECT 42', now() - interval '1 second')"
    )
    await conn.execute("UPDATE pgnotify.jobs SET enabled = false WHERE builtin")
    pools = [await dbmod.create_pool(dsn, min_size=1, max_size=2) for _ in range(3)]
    try:
        runners = [JobRunner(pool, f"worker-{i}") for i, pool in enumerate(pools)]
        ran = await asyncio.gather(*(r.run_one() for r in runners for _ in range(3)))
    finally:
        for pool in pools:
            await pool.close()
    assert sum(ran) == 1
    runs = await conn.fetch("SELECT * FROM pgnotify.job_runs WHERE job_name = 'answer'")
    assert [(r["status"], r["rows_affected"]) for r in runs] == [("succeeded", 42)]
    job = await conn.fetchrow("SELECT * FROM pgnotify.jobs WHERE name = 'answer'")
    assert job["next_run_at"] > job["last_started_at"]
    assert job["next_run_at"].minute % 5 == 0 and job["next_run_at"].second == 0


async def test_three_failures_in_a_row_raise_an_alert(dsn: str, conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE pgnotify.jobs SET enabled = false WHERE builtin")
    await conn.execute(
        "INSERT INTO pgnotify.jobs (name, schedule, command, next_run_at) VALUES ('broken', '* * * * *', 'SELECT 1/0', now())"
    )
    alerts: list[tuple[str, int, str | None]] = []

    async def alert(job: str, streak: int, error: str | None) -> None:
        alerts.append((job, streak, error))

    pool = await dbmod.create_pool(dsn, min_size=1, max_size=2)
    try:
        runner = JobRunner(pool, "w", alert=alert)
        for _ in range(4):
            await conn.execute("UPDATE pgnotify.jobs SET next_run_at = now() WHERE name = 'broken'")
            assert await runner.run_one()
    finally:
        await pool.close()
    assert [a[:2] for a in alerts] == [("broken", 3)]  # once, at the third failure in a row
    assert "22012" in (alerts[0][2] or "")  # division_by_zero
    assert (
        await conn.fetchval("SELECT consecutive_failures FROM pgnotify.jobs WHERE name = 'broken'")
        == 4
    )


async def test_the_worker_runs_jobs_alerts_admins_and_shows_them_in_status(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute("UPDATE pgnotify.jobs SET enabled = false WHERE builtin")
    await conn.execute(
        "INSERT INTO pgnotify.jobs (name, schedule, command, next_run_at) VALUES ('nightly_reminders', '* * * * *', 'SELECT no_such_function()', now())"
    )
    await conn.execute(
        "UPDATE pgnotify.jobs SET consecutive_failures = 2 WHERE name = 'nightly_reminders'"
    )
    settings = sink_settings(alert_recipients="email:ops@example.com")
    async with running(settings) as service:
        await wait_rows_until(
            conn, "SELECT count(*) FROM pgnotify.notifications WHERE category = 'system_alert'"
        )
        alert = await conn.fetchrow(
            "SELECT * FROM pgnotify.notifications WHERE category = 'system_alert'"
        )
        await wait_rows(conn, [alert["id"]], {"sent"}, service)
        async with aiohttp.ClientSession() as http:
            status = await (await http.get(f"http://127.0.0.1:{service.http_port}/status")).json()
            metrics = await (await http.get(f"http://127.0.0.1:{service.http_port}/metrics")).text()
    job = next(j for j in status["jobs"] if j["name"] == "nightly_reminders")
    assert (job["last_status"], job["consecutive_failures"]) == ("failed", 3)
    assert alert["recipient"] == "ops@example.com" and "nightly_reminders" in alert["subject"]
    assert 'pgnotify_job_consecutive_failures{periodic_job="nightly_reminders"} 3.0' in metrics


async def wait_rows_until(conn: asyncpg.Connection, sql: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await conn.fetchval(sql):
            await asyncio.sleep(0.05)


async def test_retention_deletes_in_batches_and_keeps_what_it_must(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body) SELECT 'email', 'a@b.co', 'Hi', 'x' FROM generate_series(1, 14)"
    )
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.notifications ORDER BY id")]
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event) SELECT id, 'sent' FROM pgnotify.notifications"
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'sent', sent_at = now() WHERE id <= $1", ids[11]
    )
    await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", ids[12])
    await conn.execute(
        "UPDATE pgnotify.notifications SET updated_at = now() - interval '40 days' WHERE id <= $1",
        ids[12],
    )
    notices: list[str] = []
    conn.add_log_listener(lambda _c, message: notices.append(message.message))
    await conn.execute("CALL pgnotify.apply_retention(batch => 5)")
    left = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.notifications ORDER BY id")]
    assert left == [ids[12], ids[13]]  # the dead one (kept 90 days) and the recent queued one
    # events are not deleted row by row: they leave with their day's partition (schema 0015)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.events") == 14
    assert [n for n in notices if "retention" in n] == [
        "pgnotify retention: 5 rows",
        "pgnotify retention: 5 rows",
        "pgnotify retention: 2 rows",
    ]  # three transactions, none holding more than five rows


# --- monitoring views -----------------------------------------------------------------------------


async def test_dashboard_and_failed_report(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, subject, body) SELECT 'email', 'a@b.co', 'Hi', 'x' FROM generate_series(1, 5)"
    )
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM pgnotify.notifications ORDER BY id")]
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'sent', sent_at = created_at + interval '2 seconds' WHERE id = ANY($1)",
        ids[:3],
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'failed', last_error = 'HTTP 400' WHERE id = $1",
        ids[3],
    )
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, error_code, error) VALUES ($1, 'failed', 'http_400', 'HTTP 400')",
        ids[3],
    )
    await conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY pgnotify.notifications_dashboard")
    day = await conn.fetchrow(
        "SELECT * FROM pgnotify.notifications_dashboard WHERE channel = 'email'"
    )
    assert (day["total"], day["sent"], day["failed"], day["pending"]) == (5, 3, 1, 1)
    assert day["success_rate"] == pytest.approx(75.0)
    assert day["avg_seconds_to_sent"] == pytest.approx(2.0)
    assert day["p95_seconds_to_sent"] == pytest.approx(2.0)
    report = await conn.fetch("SELECT * FROM pgnotify.failed_report")
    assert [(r["id"], r["error_code"], r["last_error"]) for r in report] == [
        (ids[3], "http_400", "HTTP 400")
    ]
    timeline = await conn.fetch(
        "SELECT event FROM pgnotify.processing_timeline WHERE notification_id = $1 ORDER BY at, seq",
        ids[3],
    )
    assert [t["event"] for t in timeline] == ["queued", "failed"]


async def test_html_email_templates_extend_a_stored_layout(
    conn: asyncpg.Connection, sink_settings: Callable[..., Settings]
) -> None:
    await conn.execute(
        """
        INSERT INTO pgnotify.templates (key, channel, locale, version, html_body, body) VALUES
          ('layout', 'email', '', 1, '<main>{% block content %}{% endblock %}</main><small>v1</small>', 'unused'),
          ('layout', 'email', '', 2, '<main>{% block content %}{% endblock %}</main><small>Acme</small>', 'unused'),
          ('receipt', 'email', '', 1, '{% extends "layout" %}{% block content %}Paid {{ amount }}{% endblock %}', 'Paid {{ amount }}');
        UPDATE pgnotify.templates SET subject = 'Receipt' WHERE key = 'receipt';
        """
    )
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'a@example.com', template => 'receipt', payload => '{\"amount\": \"9 €\"}')"
    )
    settings = sink_settings()
    async with running(settings) as service:
        rows = await wait_rows(conn, [nid], DONE, service)
    assert rows[0]["status"] == "sent"
    (message,) = outbox(settings)
    assert (
        message["html"] == "<main>Paid 9 €</main><small>Acme</small>"
    )  # the newest layout version
    assert message["text"] == "Paid 9 €"
