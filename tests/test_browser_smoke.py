"""The browser the page tests drive starts, loads a page served on 127.0.0.1 and runs its
script (so a console or inbox test failing means the page, not the harness)."""

from __future__ import annotations

from aiohttp import web

from tests.support import browser


async def test_headless_chromium_renders_a_local_page_and_runs_its_script() -> None:
    async def index(_request: web.Request) -> web.Response:
        return web.Response(
            text="<title>t</title><p id=p>before</p><script src=/s.js></script>",
            content_type="text/html",
        )

    async def script(_request: web.Request) -> web.Response:
        return web.Response(
            text="document.getElementById('p').textContent = 'after';",
            content_type="text/javascript",
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/s.js", script)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with browser.page() as p:
            await p.goto(f"http://127.0.0.1:{port}/")
            await p.wait_for_function("document.getElementById('p').textContent === 'after'")
            shot = await browser.screenshot(p, "browser-smoke")
            assert shot.stat().st_size > 0
    finally:
        await runner.cleanup()
