"""The admin console in a real headless browser (tests/support/browser.py): log in, the overview's
counts (and their live update), filter and search, the detail timeline, a dead notification
retried and delivered, a bulk cancel acting on exactly the previewed rows, the viewer's limits,
CSRF, logging out. Screenshots of each page go to test-artifacts/screenshots/console-*.png."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from pgnotify_worker.config import Settings
from tests.support import browser
from tests.support.db import wait_rows
from tests.support.webhooks import WebhookSink
from tests.support.worker import running

ADMIN = "admin-pw-correct-horse"
VIEWER = "viewer-pw-battery-staple"
VIEWPORT: Any = {"viewport": {"width": 1360, "height": 900}}


def settings(make: Callable[..., Settings]) -> Settings:
    return make(console_admin_password=ADMIN, console_viewer_password=VIEWER, channels="webhook")


async def insert(conn: asyncpg.Connection, url: str, **columns: Any) -> int:
    """A webhook row (scheduled a day ahead unless run_at is given)."""
    values = {"channel": "webhook", "recipient": url, "payload": {"n": 1}}
    values.update({k: v for k, v in columns.items() if k != "run_at"})
    run_at = columns.get("run_at", "now() + interval '1 day'")
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    nid: int = await conn.fetchval(
        f"INSERT INTO pgnotify.notifications ({names}, run_at) "
        f"VALUES ({params}, {run_at}) RETURNING id",
        *values.values(),
    )
    return nid


async def make_dead(conn: asyncpg.Connection, nid: int, error: str) -> None:
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = 'dead', attempts = max_attempts, "
        "last_error = $2, run_at = now() WHERE id = $1",
        nid,
        error,
    )
    await conn.execute(
        "INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider, "
        "error_code, error, duration_ms) VALUES ($1, 'dead', 5, 'test', 'webhook', 'http_503', $2, 12)",
        nid,
        error,
    )


async def log_in(p: Any, url: str, password: str) -> None:
    await p.goto(f"{url}/console/")
    assert p.url.endswith("/console/login")  # logged out: redirected to the form
    await p.get_by_label("Password").fill(password)
    await p.get_by_role("button", name="Log in").click()
    await p.wait_for_url(f"{url}/console/")


async def cell(p: Any, channel: str, count: str) -> str:
    text: str = await p.locator(
        f'#queue tr[data-channel="{channel}"] td[data-count="{count}"]'
    ).inner_text()
    return text.strip()


async def test_an_admin_finds_retries_and_bulk_cancels_in_the_browser(
    worker_settings: Callable[..., Settings],
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
) -> None:
    hook = f"{webhook_sink.url}/hooks/orders"
    for _ in range(3):
        await insert(conn, hook, category="orders")
    dead = await insert(conn, hook, user_id="user-42", category="billing")
    await make_dead(conn, dead, "http_503: upstream unavailable")
    other_dead = await insert(conn, f"{webhook_sink.url}/hooks/other")
    await make_dead(conn, other_dead, "http_410: gone")
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES "
        "('order_shipped', 'webhook', 'Order {{ order }} shipped', "
        "'Hello {{ name }}, order {{ order }} is on its way.')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, locale) "
        "VALUES ('user-42', 'ada@example.com', 'en')"
    )
    # an hour of history for the chart: sent rows (and a few failures) minute by minute
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'inapp', 'member-' || g, '{}' FROM generate_series(1, 400) g"
    )
    await conn.execute(
        "UPDATE pgnotify.notifications SET status = CASE WHEN id % 23 = 0 THEN 'failed' "
        "ELSE 'sent' END, sent_at = now(), "
        "updated_at = now() - make_interval(mins => ((id * 7) % 60)::int) - make_interval(secs => id % 50) "
        "WHERE channel = 'inapp'"
    )
    async with running(settings(worker_settings)) as service, browser.page(**VIEWPORT) as p:
        url = f"http://127.0.0.1:{service.http_port}"
        await log_in(p, url, ADMIN)

        # overview: the right counts, then a live update without reloading
        assert await cell(p, "webhook", "scheduled") == "3"
        assert await cell(p, "webhook", "dead") == "2"
        await browser.screenshot(p, "console-overview")
        await insert(conn, hook, category="orders")
        # (a locator wait: wait_for_function evaluates a string, which our CSP forbids)
        from playwright.async_api import expect

        live = p.locator('#queue tr[data-channel="webhook"] td[data-count="scheduled"]')
        await expect(live).to_have_text("4", timeout=20_000)  # a NOTIFY, at worst a 5 s tick

        # the list: search by user id, then filter by status
        await p.get_by_role("link", name="Notifications").click()
        await p.get_by_label("Search").fill("user-42")
        await p.get_by_role("button", name="Filter").click()
        assert await p.locator("#list tbody tr[data-id]").count() == 1
        assert await p.locator(f'#list tr[data-id="{dead}"]').count() == 1
        await p.get_by_label("Search").fill("")
        await p.get_by_label("Status").select_option("dead")
        await p.get_by_role("button", name="Filter").click()
        ids = await p.locator("#list tbody tr[data-id]").evaluate_all(
            "rows => rows.map(r => Number(r.dataset.id))"
        )
        assert ids == [other_dead, dead]  # newest first
        await browser.screenshot(p, "console-notifications")

        # the detail page and its timeline; Retry delivers it
        await p.locator(f'#list tr[data-id="{dead}"] a').first.click()
        await p.wait_for_url(f"{url}/console/notifications/{dead}")
        timeline = await p.locator("#timeline").inner_text()
        assert "queued" in timeline and "dead" in timeline and "upstream unavailable" in timeline
        await browser.screenshot(p, "console-notification")
        await p.get_by_role("button", name="Retry").click()
        await p.wait_for_url(f"{url}/console/notifications/{dead}?done=retry")
        rows = await wait_rows(conn, [dead], {"sent"}, service)
        uid = str(await conn.fetchval("SELECT uid FROM pgnotify.notifications WHERE id = $1", dead))
        assert webhook_sink.for_id(f"pgn_{uid}"), "the retried notification reached the webhook"
        assert rows[0]["attempts"] == 1
        await p.reload()
        timeline = await p.locator("#timeline").inner_text()
        assert "replayed" in timeline and "sent" in timeline
        assert "console:admin@127.0.0.1" in timeline
        await browser.screenshot(p, "console-notification-retried")

        # bulk cancel by filter: exactly the previewed rows, not those added after the preview
        await p.goto(f"{url}/console/notifications?category=orders&status=scheduled")
        previewed = await p.locator("#list tbody tr[data-id]").evaluate_all(
            "rows => rows.map(r => Number(r.dataset.id))"
        )
        assert len(previewed) == 4
        await p.get_by_role("button", name="Cancel all matching…").click()
        assert await p.locator("#bulk-preview").get_attribute("data-rows") == "4"
        await browser.screenshot(p, "console-bulk-preview")
        late = [await insert(conn, hook, category="orders") for _ in range(2)]
        await p.get_by_role("button", name="Confirm: cancel 4").click()
        assert "Cancelled 4 notifications" in await p.locator("#bulk-result").inner_text()
        states = dict(
            await conn.fetch(
                "SELECT id, status FROM pgnotify.notifications WHERE id = ANY($1)",
                previewed + late,
            )
        )
        assert {states[i] for i in previewed} == {"cancelled"}
        assert {states[i] for i in late} == {"scheduled"}

        # the other pages
        await p.goto(f"{url}/console/dead-letters")
        assert "http_410: gone" in await p.locator("#groups").inner_text()
        await browser.screenshot(p, "console-dead-letters")
        await p.goto(f"{url}/console/templates")
        await p.get_by_role("link", name="order_shipped").click()
        await p.get_by_label("Sample payload (JSON object)").fill('{"name": "Ada", "order": 7}')
        await p.get_by_role("button", name="Render").click()
        assert "Order 7 shipped" in await p.locator("#preview").inner_text()
        await browser.screenshot(p, "console-template")
        await p.goto(f"{url}/console/templates")
        await browser.screenshot(p, "console-templates")
        await p.get_by_role("link", name="Recipients").click()
        await p.get_by_label("User id").fill("user-42")
        await p.get_by_role("button", name="Look up").click()
        assert "ada@example.com" in await p.content()
        await browser.screenshot(p, "console-recipient")

        # a POST without the CSRF token is refused, even with the admin's cookie
        refused = await p.request.post(
            f"{url}/console/notifications/{other_dead}/retry", form={}, max_redirects=0
        )
        assert refused.status == 403
        assert (
            await conn.fetchval(
                "SELECT status FROM pgnotify.notifications WHERE id = $1", other_dead
            )
            == "dead"
        )

        # logging out ends the session: pages send back to the login form
        await p.get_by_role("button", name="Log out").click()
        await p.wait_for_url(f"{url}/console/login")
        await browser.screenshot(p, "console-login")
        await p.goto(f"{url}/console/notifications")
        assert p.url == f"{url}/console/login"


async def test_the_viewer_cannot_retry_in_the_browser(
    worker_settings: Callable[..., Settings],
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
) -> None:
    dead = await insert(conn, f"{webhook_sink.url}/private/path", user_id="user-7")
    await make_dead(conn, dead, "http_503: upstream unavailable")
    async with running(settings(worker_settings)) as service, browser.page(**VIEWPORT) as p:
        url = f"http://127.0.0.1:{service.http_port}"
        await log_in(p, url, VIEWER)
        assert await p.get_by_role("button", name="Pause").count() == 0
        await p.goto(f"{url}/console/notifications/{dead}")
        assert await p.get_by_role("button", name="Retry").count() == 0
        assert "/private/path" not in await p.content()  # the address is masked
        await browser.screenshot(p, "console-viewer-notification")
        token = await p.locator('input[name="csrf"]').first.get_attribute("value")
        forged = await p.request.post(
            f"{url}/console/notifications/{dead}/retry", form={"csrf": token}, max_redirects=0
        )
        assert forged.status == 403
    assert await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", dead) == (
        "dead"
    )
