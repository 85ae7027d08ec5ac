"""The preference API (GET/PUT /api/preferences) for apps that build their own page: user tokens,
validation errors that name the field, isolation between users, CORS."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from pgnotify_worker.config import Settings
from pgnotify_worker.core import app_tokens
from pgnotify_worker.service import Service
from tests.support.roles import LoginAs
from tests.support.worker import running, settings_for

SECRET = "app-token-secret-0123456789abcdef-xyz"
APP = "https://app.example.com"


def token_for(user: str, secret: str = SECRET, **kw: Any) -> str:
    return app_tokens.issue(secret.encode(), user, int(time.time()), **kw)


@pytest.fixture(params=["owner", "pgnotify_worker"])
async def api(
    request: pytest.FixtureRequest, conn: asyncpg.Connection, dsn: str, login_as: LoginAs
) -> AsyncIterator[str]:
    """The API's base URL, served by a worker as the owner and as a pgnotify_worker login."""
    await conn.execute(
        "INSERT INTO pgnotify.categories (name, channels) VALUES ('news', '{email,push}')"
    )
    url = dsn
    extra: dict[str, Any] = {}
    if request.param == "pgnotify_worker":
        url = await login_as("pgnotify_worker")
        extra["migrate_on_start"] = False
    settings = settings_for(url, app_token_secret=SECRET, app_cors_origins=APP, **extra)
    async with running(settings) as service:
        yield f"http://127.0.0.1:{service.http_port}/api/preferences"


async def call(
    method: str, url: str, token: str | None, body: Any = None, **headers: str
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as answer,
    ):
        data = await answer.json() if answer.content_type == "application/json" else None
        return answer.status, data, answer.headers


async def test_get_shows_the_token_users_preferences(api: str, conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.preferences (user_id, channel, category, setting) "
        "VALUES ('ann', 'push', 'news', 'daily')"
    )
    status, view, _ = await call("GET", api, token_for("ann"))
    assert status == 200
    assert view["user_id"] == "ann"
    by_name = {c["name"]: c for c in view["categories"]}
    assert by_name["news"]["channels"] == {"email": "immediate", "push": "daily"}
    assert by_name["security"]["critical"] is True
    assert by_name["marketing"]["requires_consent"] is True
    assert "pgnotify_status" not in by_name and "system_alert" not in by_name
    assert (view["timezone"], view["quiet_hours"], view["unsubscribed"]) == ("UTC", None, False)


async def test_put_changes_and_records_the_source(api: str, conn: asyncpg.Connection) -> None:
    body = {
        "preferences": {"news": {"email": "off", "push": "weekly"}},
        "timezone": "Asia/Tokyo",
        "quiet_hours": {"start": "23:00", "end": "06:00"},
        "unsubscribed": False,
    }
    status, view, _ = await call("PUT", api, token_for("ann"), body)
    assert status == 200, view
    assert view["changed"] == 4
    news = next(c for c in view["categories"] if c["name"] == "news")
    assert news["channels"] == {"email": "off", "push": "weekly"}
    assert view["quiet_hours"] == {"start": "23:00", "end": "06:00"}
    rows = await conn.fetch(
        "SELECT channel, setting, source FROM pgnotify.preferences WHERE user_id = 'ann' "
        "ORDER BY channel"
    )
    assert [tuple(r) for r in rows] == [
        ("email", "off", "preference_api"),
        ("push", "weekly", "preference_api"),
    ]
    sources = await conn.fetch(
        "SELECT DISTINCT source FROM pgnotify.preference_history WHERE user_id = 'ann'"
    )
    assert [r["source"] for r in sources] == ["preference_api"]
    # the same PUT again changes nothing and records nothing
    status, view, _ = await call("PUT", api, token_for("ann"), body)
    assert (status, view["changed"]) == (200, 0)


async def test_a_token_for_one_user_never_touches_another(
    api: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, timezone) VALUES ('bob', 'Europe/Berlin')"
    )
    status, view, _ = await call(
        "PUT",
        api + "?user_id=bob",  # a query string names nobody: the token does
        token_for("ann"),
        {"preferences": {"news": {"email": "off"}}, "unsubscribed": True},
    )
    assert status == 200 and view["user_id"] == "ann"
    status, bob, _ = await call("GET", api + "?user_id=bob", token_for("ann"))
    assert bob["user_id"] == "ann"
    assert (
        await conn.fetchval("SELECT count(*) FROM pgnotify.preferences WHERE user_id = 'bob'") == 0
    )
    assert await conn.fetchval(
        "SELECT unsubscribed_at IS NULL FROM pgnotify.contacts WHERE user_id = 'bob'"
    )
    status, bob, _ = await call("GET", api, token_for("bob"))
    assert (bob["timezone"], bob["unsubscribed"]) == ("Europe/Berlin", False)


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (None, "Authorization: Bearer"),
        ("not-a-jwt", "compact JWT"),
        (lambda: token_for("ann", secret="another-secret-0123456789abcdefgh"), "signature"),
        (lambda: app_tokens.issue(SECRET.encode(), "ann", int(time.time()) - 7200, 60), "expired"),
        (lambda: token_for("ann", ttl_seconds=10 * 86_400), "longer than"),
    ],
)
async def test_without_a_valid_token_nothing_is_read_or_written(
    api: str, conn: asyncpg.Connection, token: Any, words: str
) -> None:
    value = token() if callable(token) else token
    for method, body in (("GET", None), ("PUT", {"unsubscribed": True})):
        status, answer, headers = await call(method, api, value, body)
        assert status == 401
        assert words in answer["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.contacts") == 0


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"preferences": {"nope": {"email": "off"}}}, "category", "unknown category 'nope'"),
        ({"preferences": {"news": {"fax": "off"}}}, "channel", "unknown channel 'fax'"),
        ({"preferences": {"news": {"email": "sometimes"}}}, "setting", "must be one of"),
        ({"preferences": {"security": {"email": "off"}}}, "category", "security is critical"),
        ({"preferences": {"security": {"sms": "daily"}}}, "category", "cannot be turned off"),
        ({"preferences": ["news"]}, "preferences", "must be"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours", "HH:MM"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours", "HH:MM"),
        ({"unsubscribed": "yes"}, "unsubscribed", "true or false"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ([1, 2], None, "JSON object"),
    ],
)
async def test_invalid_changes_get_422_naming_the_field_and_change_nothing(
    api: str, conn: asyncpg.Connection, body: Any, field: str | None, words: str
) -> None:
    # valid parts beside the bad one are not applied either
    if isinstance(body, dict) and "timezone" not in body:
        body = {**body, "timezone": "Asia/Tokyo"}
    status, answer, _ = await call("PUT", api, token_for("ann"), body)
    assert status == 422, answer
    assert answer["field"] == field
    assert words in answer["error"]
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.preferences") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.contacts") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.preference_history") == 0


async def test_a_body_that_is_not_json_or_too_large(api: str) -> None:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token_for('ann')}"}
        bad = await http.put(api, data=b"{nope", headers=headers)
        assert bad.status == 400 and "not JSON" in (await bad.json())["error"]
        big = await http.put(api, data=b" " * (65 * 1024), headers=headers)
        assert big.status == 413


async def test_cors_for_the_configured_origins_only(api: str) -> None:
    async with aiohttp.ClientSession() as http:
        pre = await http.options(
            api,
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status == 204
        assert pre.headers["Access-Control-Allow-Origin"] == APP
        assert "PUT" in pre.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
        assert "Access-Control-Allow-Credentials" not in pre.headers  # bearer tokens, no cookies
        evil = await http.options(api, headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in evil.headers
    status, _, headers = await call("GET", api, token_for("ann"), Origin=APP)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP
    status, _, headers = await call("GET", api, None, Origin=APP)  # errors readable too
    assert status == 401 and headers["Access-Control-Allow-Origin"] == APP


async def test_without_an_app_token_secret_the_api_is_absent(
    worker_settings: Callable[..., Settings],
) -> None:
    service: Service
    async with running(worker_settings()) as service:
        url = f"http://127.0.0.1:{service.http_port}/api/preferences"
        status, _, _ = await call("GET", url, token_for("ann"))
        assert status == 404
        status, _, _ = await call("GET", url.replace("/api/preferences", "/preferences"), None)
        assert status == 404  # nor the page, without an unsubscribe (link) secret


async def test_saving_nothing_new_writes_nothing(api: str, conn: asyncpg.Connection) -> None:
    body = {
        "timezone": "UTC",
        "quiet_hours": None,
        "unsubscribed": False,
        "preferences": {"news": {"email": "immediate"}},
    }
    status, view, _ = await call("PUT", api, token_for("newcomer"), body)
    assert (status, view["changed"]) == (200, 0)
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.contacts") == 0  # no empty row
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.preference_history") == 0
