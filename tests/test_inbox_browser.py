"""examples/inbox/ in headless Chromium: the page is served from its own origin (a static server
on another port), the worker's inbox API allows that origin (CORS); a message inserted with SQL
appears on the page live, and marking it read updates the unread count."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from aiohttp import web

from tests.support import browser, inbox

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inbox"


async def test_the_example_page_shows_a_new_message_live_and_marks_it_read(
    dsn: str, conn: asyncpg.Connection
) -> None:
    browser.require_browser()
    await inbox.prepare(conn)
    await inbox.add(conn, "ada", "An older message")
    static = web.Application()
    static.router.add_static("/", EXAMPLE)
    runner = web.AppRunner(static, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    origin = f"http://127.0.0.1:{port}"
    try:
        async with inbox.serve(dsn, cors_origins=[origin]) as api, browser.page() as page:
            await inbox.ready(api)
            await page.goto(f"{origin}/index.html#api={api.url}&token={api.token('ada')}")
            await page.wait_for_function("document.getElementById('state').textContent === 'live'")
            await page.wait_for_function("document.getElementById('unread').textContent === '1'")
            assert api.hub.streams == 1

            await inbox.add(conn, "ada", "Your order has shipped")  # the producer's INSERT
            fresh = page.locator("li", has_text="Your order has shipped")
            await fresh.wait_for()
            await page.wait_for_function("document.getElementById('unread').textContent === '2'")
            assert await page.locator("li").first.text_content() == (
                "Your order has shippedbodyMark read"
            )  # newest first
            await browser.screenshot(page, "inbox-new-message")

            await fresh.locator("button.mark-read").click()
            await page.wait_for_function("document.getElementById('unread').textContent === '1'")
            await fresh.locator("button.mark-read").wait_for(state="detached")
            read_at = await conn.fetchval(
                "SELECT read_at FROM pgnotify.inbox WHERE title = 'Your order has shipped'"
            )
            assert read_at is not None
            await browser.screenshot(page, "inbox-marked-read")

            await page.locator("#read-all").click()
            await page.wait_for_function("document.getElementById('unread').textContent === '0'")
            await browser.screenshot(page, "inbox-all-read")
    finally:
        await runner.cleanup()
