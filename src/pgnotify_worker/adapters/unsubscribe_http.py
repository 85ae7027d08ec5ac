"""GET /unsubscribe (a confirmation page) and RFC 8058 one-click POST /unsubscribe."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable

from aiohttp import web

from pgnotify_worker.adapters.db import DB_ERRORS, QueueStore
from pgnotify_worker.core.unsubscribe import ALL, TokenInvalid, read_token

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto}}</style>
</head><body><h1>{title}</h1><p>{text}</p></body></html>
"""


def page(title: str, text: str, status: int) -> web.Response:
    body = PAGE.format(title=html.escape(title), text=html.escape(text))
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


class UnsubscribePages:
    """Both forms record the same opt-out and can be repeated safely."""

    def __init__(
        self,
        store: Callable[[], QueueStore | None],
        key: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.key = key
        self.clock = clock

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/unsubscribe", self.confirm)
        app.router.add_post("/unsubscribe", self.one_click)

    async def _opt_out(self, token: str) -> tuple[int, str]:
        """(HTTP status, what happened) for a token."""
        if self.key is None:
            raise web.HTTPNotFound()
        try:
            wanted = read_token(self.key, token, int(self.clock()))
        except TokenInvalid as exc:
            return 400, str(exc)
        store = self.store()
        if store is None:
            return 503, "please try again in a minute"
        try:
            await store.opt_out(wanted.user_id, wanted.category)
        except DB_ERRORS:
            return 503, "please try again in a minute"
        log.info(
            "unsubscribed a user from %s",
            "everything" if wanted.category == ALL else wanted.category,
            extra={"action": "unsubscribed"},
        )
        what = "all notifications" if wanted.category == ALL else f"{wanted.category} notifications"
        return 200, what

    async def confirm(self, request: web.Request) -> web.Response:
        status, detail = await self._opt_out(request.query.get("token", ""))
        if status == 200:
            return page("You are unsubscribed", f"You will no longer receive {detail}.", 200)
        if status == 400:
            return page("This link does not work", f"Sorry: {detail}. Nothing was changed.", 400)
        return page("Not right now", f"Sorry: {detail}. Nothing was changed.", status)

    async def one_click(self, request: web.Request) -> web.Response:
        """RFC 8058: the mail client POSTs List-Unsubscribe=One-Click to the same URL."""
        await request.post()  # the body says List-Unsubscribe=One-Click; the token is the URL's
        status, detail = await self._opt_out(request.query.get("token", ""))
        text = f"unsubscribed from {detail}" if status == 200 else detail
        return web.Response(text=text, status=status)
