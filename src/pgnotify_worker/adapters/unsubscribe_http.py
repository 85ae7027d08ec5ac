"""Unsubscribe links per RFC 8058: GET /unsubscribe shows a confirmation page and changes nothing
(nor does HEAD: link scanners and prefetchers open links); POST /unsubscribe records the opt-out,
idempotently. The POST is the mail client's one-click request (body List-Unsubscribe=One-Click,
multipart/form-data or urlencoded) or the page's own form, which sends the same field.

A critical category cannot be opted out of: its page says so and has no form, and a POST for it
records nothing. A tampered, expired or malformed token gets 400 and changes nothing."""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import time
from collections.abc import Callable
from urllib.parse import quote

from aiohttp import web

from pgnotify_worker.adapters.db import DB_ERRORS, QueueStore
from pgnotify_worker.core.unsubscribe import ALL, TokenInvalid, Unsubscribe, read_token

log = logging.getLogger(__name__)

STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}"
    "button{font:inherit;padding:.5rem 1.25rem;cursor:pointer}"
)


def security_headers(style: str) -> dict[str, str]:
    """Headers of a page served from a link carrying a token: no script, no outside resource,
    its only style allowed by hash, forms only to this origin, never framed, never cached, no
    Referer (the token is in the URL). The preference centre's pages use them too."""
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


SECURITY_HEADERS = security_headers(STYLE)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title><style>{style}</style>
</head><body><h1>{title}</h1><p>{text}</p>{form}</body></html>
"""

# The same signed URL (relative: right behind any proxy path), the RFC 8058 field in the body.
FORM = """<form method="post" action="?token={token}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>
"""

ESSENTIAL = (
    "Essential messages about your account, such as security alerts, are still sent: they "
    "cannot be turned off."
)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def page(title: str, text: str, status: int, token: str | None = None) -> web.Response:
    """An HTML page; everything shown is escaped. With `token`, the confirm form."""
    form = FORM.format(token=html.escape(quote(token, safe=""))) if token else ""
    body = PAGE.format(title=html.escape(title), text=html.escape(text), style=STYLE, form=form)
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def broken(reason: str) -> web.Response:
    """400: the link or the request cannot be used; nothing changed."""
    return page("This link does not work", f"Sorry: {reason}. Nothing was changed.", 400)


def unavailable() -> web.Response:
    """503 while the database cannot be asked."""
    return page("Not right now", "Sorry: please try again in a minute. Nothing was changed.", 503)


def subject(wanted: Unsubscribe) -> str:
    """'all notifications' or '<category> notifications'."""
    return "all notifications" if wanted.category == ALL else f"{wanted.category} notifications"


def cannot_stop(wanted: Unsubscribe) -> web.Response:
    """The page of a critical category: no form, no claim that anything will stop."""
    return page(
        f"{wanted.category} notifications cannot be turned off",
        "They are essential messages about your account and are sent whatever your settings. "
        "Nothing was changed.",
        200,
    )


class UnsubscribePages:
    """GET confirms, POST records; `store` is a callable because the pool comes up later."""

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
        app.router.add_get("/unsubscribe", self.confirm)  # HEAD too: the same, without a body
        app.router.add_post("/unsubscribe", self.one_click)

    def _read(self, request: web.Request) -> Unsubscribe | web.Response:
        """What the link asks for, or the 400 page."""
        if self.key is None:
            raise web.HTTPNotFound()
        try:
            return read_token(self.key, request.query.get("token", ""), int(self.clock()))
        except TokenInvalid as exc:
            return broken(str(exc))

    async def _critical(self, wanted: Unsubscribe) -> bool | None:
        """Is the link's category critical? None while the database cannot say."""
        if wanted.category == ALL:
            return False
        store = self.store()
        if store is None:
            return None
        try:
            return await store.category_is_critical(wanted.category)
        except DB_ERRORS:
            return None

    async def confirm(self, request: web.Request) -> web.Response:
        """GET/HEAD: the confirmation page. Changes nothing."""
        wanted = self._read(request)
        if isinstance(wanted, web.Response):
            return wanted
        critical = await self._critical(wanted)
        if critical is None:
            return unavailable()
        if critical:
            return cannot_stop(wanted)
        text = f"Press the button to stop receiving {subject(wanted)}."
        if wanted.category == ALL:
            text += " " + ESSENTIAL
        return page(
            f"Unsubscribe from {subject(wanted)}?", text, 200, request.query.get("token", "")
        )

    async def one_click(self, request: web.Request) -> web.Response:
        """POST: RFC 8058 one-click or the page's form (List-Unsubscribe=One-Click) records it."""
        wanted = self._read(request)
        if isinstance(wanted, web.Response):
            return wanted
        if request.content_type not in FORM_TYPES:
            return broken("the request is not a form")
        try:
            form = await request.post()  # over MAX_BODY: 413
        except web.HTTPException:
            raise
        except Exception:  # any body the form parsers refuse is the sender's fault: 400
            return broken("the form cannot be read")
        if form.get("List-Unsubscribe") != "One-Click":
            return broken("the form does not say List-Unsubscribe=One-Click")
        critical = await self._critical(wanted)
        if critical is None:
            return unavailable()
        if critical:
            return cannot_stop(wanted)
        store = self.store()
        if store is None:
            return unavailable()
        try:
            await store.opt_out(wanted.user_id, wanted.category)
        except DB_ERRORS:
            return unavailable()
        log.info(
            "unsubscribed a user from %s",
            "everything" if wanted.category == ALL else wanted.category,
            extra={"action": "unsubscribed"},
        )
        text = f"You will no longer receive {subject(wanted)}."
        if wanted.category == ALL:
            text += " " + ESSENTIAL
        return page("You are unsubscribed", text, 200)
