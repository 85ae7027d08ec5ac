"""The admin console over HTTP (aiohttp client against a real worker): login, sessions, CSRF,
roles, security headers, the rate limit, actions recorded with who did them, pause/resume honoured
by the claim, live events, and list plans that stay index scans on a large table."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.console.auth import LoginLimiter, Password, Sessions, session_key
from pgnotify_worker.config import Settings
from pgnotify_worker.errors import ConfigError
from pgnotify_worker.service import Service
from tests.support.worker import running

ADMIN = "admin-pw-correct-horse"
VIEWER = "viewer-pw-battery-staple"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def console_settings(make: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "console_admin_password": ADMIN,
        "console_viewer_password": VIEWER,
        "channels": "webhook",
    }
    values.update(overrides)
    return make(**values)


def base(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


@asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: keep cookies for 127.0.0.1 (an IP address); no redirects followed by default below
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


async def log_in(http: aiohttp.ClientSession, url: str, password: str) -> aiohttp.ClientResponse:
    async with http.get(f"{url}/console/login") as page:
        token = CSRF.search(await page.text())
    assert token is not None
    async with http.post(
        f"{url}/console/login",
        data={"csrf": token.group(1), "password": password},
        allow_redirects=False,
    ) as response:
        await response.read()
        return response


async def csrf_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/console/notifications") as page:
        assert page.status == 200
        found = CSRF.search(await page.text())
    assert found is not None
    return found.group(1)


async def dead_row(conn: asyncpg.Connection, url: str = "http://127.0.0.1:9/x") -> int:
    nid: int = await conn.fetchval(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload, max_attempts) "
        "VALUES ('webhook', $1, '{\"n\": 1}', 1) RETURNING id",
        url,
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'dead', attempts = 1, "
        "last_error = 'http_503: unavailable' WHERE id = $1",
        nid,
    )
    return nid


async def test_logged_out_every_page_redirects_to_the_login_form(
    worker_settings: Callable[..., Settings],
) -> None:
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        for path in (
            "/console/",
            "/console/notifications",
            "/console/notifications/1",
            "/console/dead-letters",
            "/console/templates",
            "/console/recipients",
        ):
            async with http.get(url + path, allow_redirects=False) as r:
                assert r.status == 303, path
                assert r.headers["Location"] == "/console/login"
        async with http.get(url + "/console/login") as page:
            html = await page.text()
        assert '<label for="password">Password</label>' in html
        assert ">Log in</button>" in html


async def test_the_console_is_off_without_an_admin_password(
    worker_settings: Callable[..., Settings],
) -> None:
    async with running(worker_settings(channels="webhook")) as service, client() as http:
        response = await http.get(base(service) + "/console/login")
        response.release()
        assert response.status == 404


async def test_security_headers_and_cookie_flags(
    worker_settings: Callable[..., Settings],
) -> None:
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        response = await log_in(http, url, ADMIN)
        assert response.status == 303
        cookie = response.headers.getall("Set-Cookie")
        session = next(c for c in cookie if c.startswith("pgnotify_console="))
        assert "HttpOnly" in session
        assert "SameSite=Strict" in session
        assert "Secure" not in session  # plain HTTP, no trusted proxy
        async with http.get(url + "/console/") as page:
            assert page.status == 200
            csp = page.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert "frame-ancestors 'none'" in csp
            assert page.headers["X-Frame-Options"] == "DENY"
            assert page.headers["X-Content-Type-Options"] == "nosniff"
            assert page.headers["Cache-Control"] == "no-store"
            html = await page.text()
        # no inline script and no inline handlers: every script is a file of this origin
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
        assert re.search(r"\son[a-z]+=", html) is None
        # a forwarded HTTPS is believed only from a trusted proxy
        async with http.get(url + "/console/login", headers={"X-Forwarded-Proto": "https"}) as page:
            assert all("Secure" not in c for c in page.headers.getall("Set-Cookie", []))

    settings = console_settings(worker_settings, console_trusted_proxies="127.0.0.0/8")
    async with running(settings) as service, client() as http:
        page = await http.get(
            base(service) + "/console/login", headers={"X-Forwarded-Proto": "https"}
        )
        page.release()
        assert any("Secure" in c for c in page.headers.getall("Set-Cookie"))


async def test_login_attempts_are_rate_limited(worker_settings: Callable[..., Settings]) -> None:
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        for _ in range(10):
            assert (await log_in(http, url, "wrong")).status == 401
        refused = await log_in(http, url, ADMIN)  # even the right password, until the window ends
        assert refused.status == 429
        assert int(refused.headers["Retry-After"]) > 0


def test_the_limiter_counts_per_client_and_overall() -> None:
    limiter = LoginLimiter(per_client=3, overall=5, window=60)
    for _ in range(3):
        limiter.record("10.0.0.1", now=0)
    assert limiter.retry_after("10.0.0.1", now=1) == pytest.approx(59)
    assert limiter.retry_after("10.0.0.2", now=1) == 0
    limiter.record("10.0.0.2", now=2)
    limiter.record("10.0.0.3", now=2)
    assert limiter.retry_after("10.0.0.4", now=3) > 0  # everyone together hit the overall limit
    assert limiter.retry_after("10.0.0.1", now=61) == 0


def test_sessions_are_signed_expire_and_end_when_a_password_changes() -> None:
    key = session_key([Password("A", "one")], None)
    sessions = Sessions(key, 60)
    cookie, session = sessions.issue("viewer", now=1000)
    assert sessions.read(cookie, now=1001) == session
    assert sessions.read(cookie, now=1061) is None  # expired
    _payload, mac = cookie.split(".")
    forged = json.dumps({"r": "admin", "e": 9999, "n": session.nonce}).encode()
    import base64

    forged_payload = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert sessions.read(f"{forged_payload}.{mac}", now=1001) is None
    rotated = Sessions(session_key([Password("A", "two")], None), 60)
    assert rotated.read(cookie, now=1001) is None
    assert sessions.csrf_ok(session.nonce, sessions.csrf(session.nonce))
    assert not sessions.csrf_ok(session.nonce, sessions.csrf("other"))


def test_passwords_plain_argon2_and_bcrypt() -> None:
    argon2 = pytest.importorskip("argon2")
    bcrypt = pytest.importorskip("bcrypt")
    assert Password("P", "s3cret").verify("s3cret")
    assert not Password("P", "s3cret").verify("s3cret ")
    hashed = argon2.PasswordHasher(time_cost=1, memory_cost=1024).hash("s3cret")
    assert Password("P", hashed).kind == "argon2"
    assert Password("P", hashed).verify("s3cret")
    assert not Password("P", hashed).verify("nope")
    hashed_b = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    assert Password("P", hashed_b).kind == "bcrypt"
    assert Password("P", hashed_b).verify("s3cret")
    assert not Password("P", hashed_b).verify("nope")


def test_a_hash_without_its_library_is_a_clear_start_up_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "argon2", None)  # import argon2 raises ImportError
    with pytest.raises(ConfigError, match=r"PGNOTIFY_CONSOLE_ADMIN_PASSWORD.*console\]"):
        Password(
            "PGNOTIFY_CONSOLE_ADMIN_PASSWORD", "$argon2id$v=19$m=65536,t=3,p=4$x$y"
        ).check_available()


async def test_a_post_without_the_csrf_token_is_refused(
    worker_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    nid = await dead_row(conn)
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        assert (await log_in(http, url, ADMIN)).status == 303
        async with http.post(f"{url}/console/notifications/{nid}/retry", data={}) as r:
            assert r.status == 403
            assert "CSRF" in await r.text()
        async with http.post(
            f"{url}/console/notifications/{nid}/retry", data={"csrf": "forged"}
        ) as r:
            assert r.status == 403
    assert await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", nid) == (
        "dead"
    )


async def test_the_viewer_sees_masked_addresses_and_cannot_act(
    worker_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    nid = await dead_row(conn, "https://hooks.example.com/secret-path/abc")
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        assert (await log_in(http, url, VIEWER)).status == 303
        async with http.get(f"{url}/console/notifications/{nid}") as page:
            html = await page.text()
        assert "secret-path" not in html
        assert ">Retry</button>" not in html and ">Cancel</button>" not in html
        token = await csrf_of(http, url)  # a valid token of the viewer's own session
        async with http.post(f"{url}/console/notifications/{nid}/retry", data={"csrf": token}) as r:
            assert r.status == 403
        async with http.post(f"{url}/console/channels/webhook/pause", data={"csrf": token}) as r:
            assert r.status == 403
    assert await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", nid) == (
        "dead"
    )
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.paused_channels") == 0


async def test_admin_actions_are_events_naming_role_and_client(
    worker_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    nid = await dead_row(conn)
    queued = await conn.fetchval(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload, run_at) "
        "VALUES ('webhook', 'http://127.0.0.1:9/y', '{}', now() + interval '1 day') RETURNING id"
    )
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        assert (await log_in(http, url, ADMIN)).status == 303
        token = await csrf_of(http, url)
        async with http.post(
            f"{url}/console/notifications/{queued}/cancel",
            data={"csrf": token},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == f"/console/notifications/{queued}?done=cancel"
        async with http.post(
            f"{url}/console/channels/email/pause", data={"csrf": token}, allow_redirects=False
        ) as r:
            assert r.status == 303
        async with http.post(
            f"{url}/console/jobs/retention/run", data={"csrf": token}, allow_redirects=False
        ) as r:
            assert r.status == 303
        service.stop()  # nothing may send the dead row before we retry it
        async with http.post(
            f"{url}/console/notifications/{nid}/retry",
            data={"csrf": token},
            allow_redirects=False,
        ) as r:
            assert r.status in (303, 503)  # the server may be going away
    cancelled = await conn.fetchrow(
        "SELECT worker, detail FROM pgnotify.events WHERE notification_id = $1 "
        "AND event = 'cancelled'",
        queued,
    )
    assert cancelled["worker"] == "console:admin@127.0.0.1"
    assert cancelled["detail"]["by"] == "admin"
    audit = await conn.fetch(
        "SELECT event, worker, detail FROM pgnotify.events WHERE notification_id = 0 ORDER BY id"
    )
    assert [a["event"] for a in audit] == ["channel_paused", "job_run_requested"]
    assert all(a["worker"] == "console:admin@127.0.0.1" for a in audit)
    assert (
        await conn.fetchval(
            "SELECT paused_by FROM pgnotify.paused_channels WHERE channel = 'email'"
        )
        == "console:admin@127.0.0.1"
    )


async def test_a_paused_channel_is_not_claimed_until_resumed(conn: asyncpg.Connection) -> None:
    nid = await conn.fetchval(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "VALUES ('webhook', 'http://127.0.0.1:9/z', '{}') RETURNING id"
    )
    assert await conn.fetchval("SELECT pgnotify.pause_channel('webhook', 'provider outage')")
    assert not await conn.fetchval("SELECT pgnotify.pause_channel('webhook')")  # already
    assert await conn.fetch(queries.CLAIM, "webhook", 10, "w", 30.0, None) == []
    await conn.execute(queries.CHANNEL_HEALTH, "w", ["webhook"], [True], 30.0, "0.1.0")
    assert await conn.fetchval("SELECT ready FROM pgnotify.sendable_backlog") == 0  # no scaling
    with pytest.raises(asyncpg.CheckViolationError, match="unknown channel"):
        await conn.fetchval("SELECT pgnotify.pause_channel('fax')")
    await conn.execute("LISTEN pgnotify")
    woken: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("pgnotify", lambda *a: woken.put_nowait(a[3]))
    assert await conn.fetchval("SELECT pgnotify.resume_channel('webhook')")
    assert await asyncio.wait_for(woken.get(), 5) == "webhook"  # workers are woken
    assert await conn.fetchval("SELECT ready FROM pgnotify.sendable_backlog") == 1
    claimed = await conn.fetch(queries.CLAIM, "webhook", 10, "w", 30.0, None)
    assert [r["id"] for r in claimed] == [nid]


async def test_live_events_follow_notify(
    worker_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    async with running(console_settings(worker_settings)) as service, client() as http:
        url = base(service)
        assert (await log_in(http, url, ADMIN)).status == 303
        async with http.get(f"{url}/console/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            assert await stream.content.readline() == b"retry: 3000\n"
            await conn.execute(
                "INSERT INTO pgnotify.notifications (channel, recipient, payload, run_at) "
                "VALUES ('webhook', 'http://127.0.0.1:9/q', '{}', now() + interval '1 day')"
            )
            async with asyncio.timeout(10):
                while True:
                    line = await stream.content.readline()
                    if line == b"event: change\n":
                        break


async def test_every_page_renders_for_both_roles(
    worker_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) "
        "VALUES ('welcome', 'email', 'Hi {{ name }}', 'Welcome, {{ name }}!')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email) VALUES ('u-1', 'ada@example.com')"
    )
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('email', 'ada@example.com', template => 'welcome', "
        "payload => '{\"name\": \"<b>Ada</b>\"}', user_id => 'u-1')"
    )
    async with running(console_settings(worker_settings)) as service:
        url = base(service)
        for password in (ADMIN, VIEWER):
            async with client() as http:
                assert (await log_in(http, url, password)).status == 303
                for path in (
                    "/console/",
                    "/console/?fragment=1",
                    "/console/notifications?q=u-1",
                    f"/console/notifications/{nid}",
                    "/console/dead-letters",
                    "/console/templates",
                    "/console/templates/welcome?payload=%7B%22name%22%3A%22%3Cb%3EZed%3C%2Fb%3E%22%7D",
                    "/console/recipients?user=u-1",
                ):
                    async with http.get(url + path) as page:
                        html = await page.text()
                        assert page.status == 200, (path, html[:500])
                    assert "<b>" not in html, path  # payload values are escaped
                async with http.get(f"{url}/console/notifications/{nid}") as page:
                    html = await page.text()
                assert "Welcome, &lt;b&gt;Ada&lt;/b&gt;!" in html  # rendered as it would be sent
                assert ("ada@example.com" in html) == (password == ADMIN)


async def test_list_plans_stay_index_scans_on_a_large_table(conn: asyncpg.Connection) -> None:
    # the rows only need to exist: skip the per-row validation triggers (a superuser may)
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        """
        INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, payload,
                                            priority, status, max_attempts, run_at)
        SELECT (ARRAY['email','sms','webhook','push'])[1 + g % 4],
               CASE g % 4 WHEN 0 THEN 'user' || g || '@example.com' WHEN 1 THEN '+1555' || lpad(g::text, 7, '0')
                    WHEN 2 THEN 'https://hooks.example.com/' || g ELSE 'tok' || g END,
               'u' || (g % 50000), (ARRAY['billing','security','news'])[1 + g % 3], '{}',
               0, CASE WHEN g % 10 = 0 THEN 'queued' ELSE 'sent' END, 5, now()
        FROM generate_series(1, 100000) g
        """
    )
    await conn.execute("ANALYZE pgnotify.notifications")
    filters: list[tuple[Any, ...]] = [
        (None, None, None, None, None),
        ("queued", None, None, None, None),
        (None, "sms", None, None, None),
        (None, None, "security", None, None),
        (None, None, None, "u77", None),
        (None, None, None, "user400@example.com", None),
        (None, None, None, "12345", 12345),
        ("sent", "email", None, None, None),
    ]
    async with conn.transaction():
        await conn.execute(queries.CONSOLE_CUSTOM_PLANS)
        for f in filters:
            for before in (None, 75000):
                plan = "\n".join(
                    r[0]
                    for r in await conn.fetch("EXPLAIN " + queries.CONSOLE_LIST, *f, before, 51)
                )
                assert "Seq Scan" not in plan, (f, plan)
            preview = "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN " + queries.CONSOLE_BULK_PREVIEW, *f, ["queued", "scheduled"], 50000
                )
            )
            assert "Seq Scan on notifications" not in preview, (f, preview)


def test_the_dev_run_banner_prints_the_console_url_with_its_password(
    tmp_path: Any, worker_settings: Callable[..., Settings]
) -> None:
    from pgnotify_worker.cli import banner, dev_console_password

    password, path = dev_console_password(tmp_path)
    assert dev_console_password(tmp_path) == (password, path)  # kept across runs
    assert len(password) >= 20
    assert path.stat().st_mode & 0o777 == 0o600
    settings = worker_settings(console_admin_password=password, http_port=9090)
    text = banner(settings, "postgresql://localhost/x", None, None, path)
    assert f"console    http://127.0.0.1:9090/console/  password {password}" in text
    configured = banner(settings, "postgresql://localhost/x", None, None)
    assert password not in configured  # a password the operator set is never printed
    assert "/console/" in configured
