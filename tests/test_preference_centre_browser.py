"""The hosted preference centre in a real browser (headless Chromium): toggling a box changes the
row, a tampered link changes nothing and says so; and the page's protections over plain HTTP
(critical categories, CSRF, one token per purpose, expiry)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from pgnotify_worker.core import preference_links
from pgnotify_worker.core.unsubscribe import make_token as unsubscribe_token
from pgnotify_worker.service import Service
from tests.support import browser
from tests.support.db import wait_rows
from tests.support.worker import running

KEY = "unsubscribe-secret-0123456789abcdef"


def link_for(user: str, expires_in: int = 3600) -> str:
    return preference_links.make_token(KEY.encode(), user, int(time.time()) + expires_in)


async def setup_user(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.categories (name, description, channels) "
        "VALUES ('news', 'Product news', '{email,push}')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, timezone) "
        "VALUES ('ann', 'ann@example.com', 'Europe/Paris'), ('bob', 'bob@example.com', 'UTC')"
    )


async def prefs(conn: asyncpg.Connection, user: str) -> set[tuple[str, str, str, str]]:
    rows = await conn.fetch(
        "SELECT channel, category, setting, source FROM pgnotify.preferences WHERE user_id = $1",
        user,
    )
    return {(r["channel"], r["category"], r["setting"], r["source"]) for r in rows}


async def contact(conn: asyncpg.Connection, user: str) -> tuple[str, str | None, bool]:
    row = await conn.fetchrow(
        "SELECT timezone, to_char(quiet_start, 'HH24:MI') || '-' || to_char(quiet_end, 'HH24:MI') "
        "AS quiet, unsubscribed_at IS NOT NULL AS unsub FROM pgnotify.contacts WHERE user_id = $1",
        user,
    )
    return row["timezone"], row["quiet"], row["unsub"]


@pytest.fixture
async def centre(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings]
) -> AsyncIterator[Service]:
    await setup_user(conn)
    async with running(worker_settings(unsubscribe_secret=KEY)) as service:
        yield service


def page_url(service: Service, token: str) -> str:
    return f"http://127.0.0.1:{service.http_port}/preferences?token={token}"


# --- in the browser --------------------------------------------------------------------------------


async def test_toggling_a_box_changes_the_row_and_critical_stays_on(
    conn: asyncpg.Connection, centre: Service
) -> None:
    async with browser.page(java_script_enabled=False) as p:  # works without JavaScript
        response = await p.goto(page_url(centre, link_for("ann")))
        assert response is not None and response.status == 200
        news_email = p.locator('input[type=checkbox][value="news/email"]')
        assert await news_email.is_checked()
        security = p.get_by_label("security by Email (always on)")
        assert await security.is_checked() and await security.is_disabled()
        marketing = p.locator('input[type=checkbox][value="marketing/email"]')
        assert not await marketing.is_checked()  # needs an opt-in nobody gave
        await browser.screenshot(p, "preference-centre")

        await news_email.uncheck()
        await marketing.check()
        await p.fill("input[name=quiet_start]", "22:00")
        await p.fill("input[name=quiet_end]", "07:30")
        await p.select_option("select[name=timezone]", "America/New_York")
        await p.click("button[type=submit]")
        await p.wait_for_url("**saved=1")
        assert "Your preferences are saved" in await p.content()
        assert not await p.locator('input[type=checkbox][value="news/email"]').is_checked()
        assert await p.locator('input[type=checkbox][value="marketing/email"]').is_checked()
        await browser.screenshot(p, "preference-centre-saved")

    assert await prefs(conn, "ann") == {("email", "news", "off", "preference_centre")}
    assert await contact(conn, "ann") == ("America/New_York", "22:00-07:30", False)
    consent = await conn.fetchrow(
        "SELECT granted, source FROM pgnotify.consents WHERE user_id = 'ann' AND category = 'marketing'"
    )
    assert (consent["granted"], consent["source"]) == (True, "preference_centre")
    history = await conn.fetch(
        "SELECT field, channel, category, old_value, new_value, source "
        "FROM pgnotify.preference_history WHERE user_id = 'ann' ORDER BY id"
    )
    assert {tuple(r) for r in history} == {
        ("consent", None, "marketing", "not granted", "granted", "preference_centre"),
        ("preference", "email", "news", "immediate", "off", "preference_centre"),
        ("timezone", None, None, "Europe/Paris", "America/New_York", "preference_centre"),
        ("quiet_hours", None, None, None, "22:00-07:30", "preference_centre"),
    }
    assert await prefs(conn, "bob") == set()  # nobody else's rows moved


async def test_a_tampered_link_shows_a_clear_error_and_changes_nothing(
    conn: asyncpg.Connection, centre: Service
) -> None:
    token = link_for("ann")
    user_part = token.split(".")[1]
    forged_user = preference_links._b64(b"bob")
    tampered = token.replace(user_part, forged_user)  # someone else's preferences, same MAC
    async with browser.page() as p:
        response = await p.goto(page_url(centre, tampered))
        assert response is not None and response.status == 400
        text = await p.inner_text("body")
        assert "This link does not work" in text
        assert "has been altered" in text and "Nothing was changed" in text
        assert await p.locator("form").count() == 0
        await browser.screenshot(p, "preference-centre-tampered")

    async with aiohttp.ClientSession() as http:  # a POST with it changes nothing either
        answer = await http.post(
            page_url(centre, tampered),
            data={"shown": "news/email", "csrf": "x", "unsubscribed": "1"},
        )
        assert answer.status == 400
    assert await prefs(conn, "bob") == set()
    assert await contact(conn, "bob") == ("UTC", None, False)


# --- over plain HTTP -------------------------------------------------------------------------------


async def _csrf(http: aiohttp.ClientSession, url: str) -> str:
    text = await (await http.get(url)).text()
    return text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def test_a_forged_post_cannot_turn_off_a_critical_category(
    conn: asyncpg.Connection, centre: Service
) -> None:
    url = page_url(centre, link_for("ann"))
    async with aiohttp.ClientSession() as http:
        csrf = await _csrf(http, url)
        answer = await http.post(
            url,
            data=[
                ("csrf", csrf),
                ("shown", "security/email"),
                ("shown", "security/sms"),
                ("shown", "news/push"),
                ("on", "news/push"),
                ("timezone", "Europe/Paris"),
            ],
            allow_redirects=False,
        )
        assert answer.status == 303
        assert answer.headers["Location"].endswith("&saved=1")
    assert await prefs(conn, "ann") == set()  # nothing critical written, news/push stayed on


async def test_a_post_without_the_pages_csrf_token_is_refused(
    conn: asyncpg.Connection, centre: Service
) -> None:
    token = link_for("ann")
    url = page_url(centre, token)
    stale = preference_links.make_csrf(KEY.encode(), token, int(time.time()) - 5 * 3600)
    other_page = preference_links.make_csrf(KEY.encode(), link_for("bob"), int(time.time()))
    async with aiohttp.ClientSession() as http:
        for csrf in ("", "123.abc", stale, other_page):
            answer = await http.post(url, data={"csrf": csrf, "shown": "news/email"})
            assert answer.status == 403, csrf
            assert "Nothing was changed" in await answer.text()
        csrf = await _csrf(http, url)
        cross = await http.post(
            url,
            data={"csrf": csrf, "shown": "news/email"},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert cross.status == 403
    assert await prefs(conn, "ann") == set()


async def test_an_unsubscribe_token_is_not_a_preference_token_nor_the_reverse(
    conn: asyncpg.Connection, centre: Service
) -> None:
    unsub = unsubscribe_token(KEY.encode(), "ann", None, int(time.time()) + 3600)
    base = f"http://127.0.0.1:{centre.http_port}"
    async with aiohttp.ClientSession() as http:
        shown = await http.get(f"{base}/preferences", params={"token": unsub})
        assert shown.status == 400 and "not a preferences link" in await shown.text()
        back = await http.post(
            f"{base}/unsubscribe",
            params={"token": link_for("ann")},
            data={"List-Unsubscribe": "One-Click"},
        )
        assert back.status == 400
        expired = await http.get(f"{base}/preferences", params={"token": link_for("ann", -10)})
        assert expired.status == 400 and "expired" in await expired.text()
        csp = shown.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
    assert await contact(conn, "ann") == ("Europe/Paris", None, False)


async def test_bad_quiet_hours_are_explained_and_nothing_is_saved(
    conn: asyncpg.Connection, centre: Service
) -> None:
    url = page_url(centre, link_for("ann"))
    async with aiohttp.ClientSession() as http:
        csrf = await _csrf(http, url)
        answer = await http.post(
            url,
            data={"csrf": csrf, "shown": "news/email", "quiet_start": "22:00", "unsubscribed": "1"},
        )
        assert answer.status == 400
        assert "quiet hours need both a start and an end" in await answer.text()
    assert await contact(conn, "ann") == ("Europe/Paris", None, False)
    assert await prefs(conn, "ann") == set()


async def test_global_unsubscribe_from_the_page(conn: asyncpg.Connection, centre: Service) -> None:
    url = page_url(centre, link_for("ann"))
    async with aiohttp.ClientSession() as http:
        csrf = await _csrf(http, url)
        shown = ["news/email", "news/push", "marketing/email"]
        answer = await http.post(
            url,
            data=[("csrf", csrf), ("unsubscribed", "1")]
            + [("shown", s) for s in shown]
            + [("on", s) for s in shown[:2]],
        )
        assert answer.status == 200 and "Your preferences are saved" in await answer.text()
    assert await contact(conn, "ann") == ("Europe/Paris", None, True)
    assert await prefs(conn, "ann") == set()


async def test_templates_get_a_preferences_url(
    conn: asyncpg.Connection, worker_settings: Callable[..., Settings], tmp_path: object
) -> None:
    await setup_user(conn)
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('inapp', 'ann', body => 'Manage: {{ preferences_url }}', "
        "user_id => 'ann', category => 'news')"
    )
    settings = worker_settings(
        unsubscribe_secret=KEY, public_base_url="https://notify.example.com/"
    )
    async with running(settings) as service:
        await wait_rows(conn, [nid], {"sent"}, service)
    body = await conn.fetchval("SELECT body FROM pgnotify.inbox WHERE notification_id = $1", nid)
    prefix = "Manage: https://notify.example.com/preferences?token="
    assert body.startswith(prefix)
    link = preference_links.read_token(KEY.encode(), body[len(prefix) :], int(time.time()))
    assert link.user_id == "ann"
