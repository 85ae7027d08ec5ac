"""The preference centre: a hosted page per user reached by a signed link, and the same as a JSON
API for apps that build their own page.

Page (GET/POST /preferences?token=<signed link>): categories x channels as checkboxes, critical
categories shown as always on (disabled, and never changed whatever a POST says), time zone,
quiet hours and a global unsubscribe. No script at all (a CSP forbids any), so it works without
JavaScript. CSRF: the form posts to the same signed link and carries a per-page token (an HMAC of
the link and the time the page was shown, valid 4 hours, no cookie, no server state); a POST from
another site cannot know either; a browser's `Sec-Fetch-Site: cross-site` is refused as well.
A tampered, expired or malformed link gets 400 and changes nothing. Changes are recorded with
source 'preference_centre' (the API: 'preference_api') in pgnotify.preference_history.

API (GET/PUT /api/preferences, `Authorization: Bearer <user token>`, core.app_tokens): the user
comes from the token only, so a token for user A never reads or writes user B. CORS for
PGNOTIFY_APP_CORS_ORIGINS. Answers 404 while PGNOTIFY_APP_TOKEN_SECRET is unset."""

from __future__ import annotations

import functools
import html
import json
import logging
import re
import time
import zoneinfo
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from aiohttp import web

from pgnotify_worker.adapters.db import DB_ERRORS, QueueStore
from pgnotify_worker.adapters.unsubscribe_http import security_headers
from pgnotify_worker.core import app_tokens
from pgnotify_worker.core.preference_links import LinkInvalid, csrf_ok, make_csrf, read_token
from pgnotify_worker.errors import AppTokenError, PreferenceRejected

log = logging.getLogger(__name__)

PAGE_SOURCE = "preference_centre"
API_SOURCE = "preference_api"
MAX_API_BODY = 64 * 1024
TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
SETTINGS = ("immediate", "daily", "weekly", "off")
CHANNEL_NAMES = {
    "email": "Email",
    "sms": "SMS",
    "push": "Push",
    "webhook": "Webhook",
    "inapp": "In-app",
}

STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{padding:.4rem .8rem;text-align:left;"
    "border-bottom:1px solid #ddd}td.c{text-align:center}small{color:#555}"
    "fieldset{border:1px solid #ddd;margin:1rem 0;padding:.5rem 1rem}"
    ".ok{background:#e7f6e7;padding:.5rem 1rem}.err{background:#fde8e8;padding:.5rem 1rem}"
    "button{font:inherit;padding:.5rem 1.25rem;cursor:pointer}"
)
SECURITY_HEADERS = security_headers(STYLE)
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title><style>{style}</style>
</head><body><h1>{title}</h1>{body}</body></html>
"""
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@functools.cache
def time_zones() -> frozenset[str]:
    """IANA names this Python knows (the database checks its own list too)."""
    return frozenset(zoneinfo.available_timezones())


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def page(title: str, body: str, status: int = 200) -> web.Response:
    """An HTML page; callers escape what they put in `body`."""
    return web.Response(
        text=PAGE.format(title=e(title), style=STYLE, body=body),
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def broken(reason: str, status: int = 400) -> web.Response:
    """The link or the request cannot be used; nothing changed."""
    return page(
        "This link does not work",
        f'<p class="err">Sorry: {e(reason)}. Nothing was changed.</p>'
        "<p>Use the newest link from one of our messages.</p>",
        status,
    )


def unavailable() -> web.Response:
    return page(
        "Not right now",
        "<p>Sorry: please try again in a minute. Nothing was changed.</p>",
        503,
    )


def cell_name(category: str, channel: str) -> str:
    """A checkbox's value: channels never hold '/', so the last '/' splits it back."""
    return f"{category}/{channel}"


def render_form(view: dict[str, Any], token: str, csrf: str, note: str = "") -> str:
    """The form: one row per category, one column per channel any category uses."""
    channels = [ch for ch in CHANNEL_NAMES if any(ch in c["channels"] for c in view["categories"])]
    head = "".join(f"<th>{e(CHANNEL_NAMES[ch])}</th>" for ch in channels)
    rows = []
    for cat in view["categories"]:
        cells = []
        for ch in channels:
            if ch not in cat["channels"]:
                cells.append('<td class="c">&ndash;</td>')
                continue
            label = f"{cat['name']} by {CHANNEL_NAMES[ch]}"
            if cat["critical"]:
                cells.append(
                    f'<td class="c"><input type="checkbox" checked disabled '
                    f'aria-label="{e(label)} (always on)"></td>'
                )
                continue
            value = e(cell_name(cat["name"], ch))
            on = cat["channels"][ch] != "off" and (
                not cat["requires_consent"] or cat["consent"] is True
            )
            cells.append(
                f'<td class="c"><input type="hidden" name="shown" value="{value}">'
                f'<input type="checkbox" name="on" value="{value}" aria-label="{e(label)}"'
                f"{' checked' if on else ''}></td>"
            )
        what = f"<strong>{e(cat['name'])}</strong>"
        if cat["description"]:
            what += f"<br><small>{e(cat['description'])}</small>"
        if cat["critical"]:
            what += "<br><small>Always on: essential messages about your account.</small>"
        rows.append(f"<tr><td>{what}</td>{''.join(cells)}</tr>")
    zones = sorted(time_zones() | {view["timezone"]})
    options = "".join(
        f'<option value="{e(z)}"{" selected" if z == view["timezone"] else ""}>{e(z)}</option>'
        for z in zones
    )
    quiet = view["quiet_hours"] or {"start": "", "end": ""}
    action = e("?token=" + quote(token, safe=""))
    unsubscribed = " checked" if view["unsubscribed"] else ""
    return f"""{note}<form method="post" action="{action}">
<input type="hidden" name="csrf" value="{e(csrf)}">
<table><thead><tr><th>Notifications</th>{head}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
<fieldset><legend>Quiet hours</legend>
<p><small>Nothing but essential messages between these local times (leave both empty for
none).</small></p>
<label>From <input type="time" name="quiet_start" value="{e(quiet["start"])}"></label>
<label>to <input type="time" name="quiet_end" value="{e(quiet["end"])}"></label>
<p><label>Time zone <select name="timezone">{options}</select></label></p>
</fieldset>
<fieldset><legend>Everything</legend>
<label><input type="checkbox" name="unsubscribed" value="1"{unsubscribed}>
Unsubscribe from all notifications</label>
<p><small>Essential messages about your account, such as security alerts, are still
sent.</small></p>
</fieldset>
<button type="submit">Save preferences</button>
</form>
"""  # noqa: S608 - HTML (a <select>), not SQL


def form_changes(
    view: dict[str, Any], shown: Sequence[str], checked: Sequence[str], form: Any
) -> dict[str, Any]:
    """The changes a submitted form asks for: only cells the page showed and the user may
    change (never a critical category, whatever the POST says)."""
    on = set(checked)
    wanted: dict[str, dict[str, str]] = {}
    for cat in view["categories"]:
        if cat["critical"]:
            continue
        for ch, setting in cat["channels"].items():
            name = cell_name(cat["name"], ch)
            if name not in shown:
                continue
            displayed = setting != "off" and (not cat["requires_consent"] or cat["consent"] is True)
            if (name in on) == displayed:
                continue  # left as shown
            if name in on:  # (a category that needs consent records it: database side)
                wanted.setdefault(cat["name"], {})[ch] = (
                    "immediate" if setting == "off" else setting
                )
            else:
                wanted.setdefault(cat["name"], {})[ch] = "off"
    changes: dict[str, Any] = {"preferences": wanted}
    zone = str(form.get("timezone", "")).strip()
    if zone and zone != view["timezone"]:
        if zone not in time_zones():
            raise PreferenceRejected("timezone", f"unknown time zone {zone[:60]!r}")
        changes["timezone"] = zone
    start = str(form.get("quiet_start", "")).strip()[:5]
    end = str(form.get("quiet_end", "")).strip()[:5]
    if start or end:
        if not (TIME.match(start) and TIME.match(end)):
            raise PreferenceRejected(
                "quiet_hours", "quiet hours need both a start and an end time (HH:MM)"
            )
        changes["quiet_hours"] = {"start": start, "end": end}
    else:
        changes["quiet_hours"] = None
    changes["unsubscribed"] = form.get("unsubscribed") == "1"
    return changes


def api_changes(body: Any) -> dict[str, Any]:
    """A PUT body checked for shape (the database checks categories, channels, criticality)."""
    if not isinstance(body, dict):
        raise PreferenceRejected(None, "the body must be a JSON object")
    unknown = set(body) - {"preferences", "timezone", "quiet_hours", "unsubscribed"}
    if unknown:
        raise PreferenceRejected(
            sorted(unknown)[0],
            f"unknown field(s) {', '.join(sorted(unknown))[:200]}: use preferences, timezone, "
            "quiet_hours, unsubscribed",
        )
    prefs = body.get("preferences", {})
    if not isinstance(prefs, dict) or not all(isinstance(v, dict) for v in prefs.values()):
        raise PreferenceRejected(
            "preferences", 'preferences must be {"<category>": {"<channel>": "<setting>"}}'
        )
    for category, cells in prefs.items():
        for channel, setting in cells.items():
            if setting not in SETTINGS:
                raise PreferenceRejected(
                    "setting",
                    f"preferences.{category[:100]}.{channel[:40]} must be one of "
                    f"{', '.join(SETTINGS)}",
                )
    if "timezone" in body:
        zone = body["timezone"]
        if not isinstance(zone, str) or zone not in time_zones():
            raise PreferenceRejected(
                "timezone",
                f"unknown time zone {str(zone)[:60]!r}: use an IANA name such as Europe/Paris",
            )
    if "quiet_hours" in body and body["quiet_hours"] is not None:
        quiet = body["quiet_hours"]
        if (
            not isinstance(quiet, dict)
            or set(quiet) != {"start", "end"}
            or not all(isinstance(v, str) and TIME.match(v) for v in quiet.values())
        ):
            raise PreferenceRejected(
                "quiet_hours", 'quiet_hours must be null or {"start": "HH:MM", "end": "HH:MM"}'
            )
    if "unsubscribed" in body and not isinstance(body["unsubscribed"], bool):
        raise PreferenceRejected("unsubscribed", "unsubscribed must be true or false")
    return body


class PreferenceCentre:
    """The page and the API; `store` is a callable because the pool comes up later."""

    def __init__(
        self,
        store: Callable[[], QueueStore | None],
        link_key: bytes | None,
        *,
        app_secret: bytes | None = None,
        app_max_lifetime: int = 86_400,
        app_audience: str | None = None,
        cors_origins: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.link_key = link_key
        self.app_secret = app_secret
        self.app_max_lifetime = app_max_lifetime
        self.app_audience = app_audience
        self.cors_origins = frozenset(cors_origins)
        self.clock = clock

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/preferences", self.show)
        app.router.add_post("/preferences", self.save)
        app.router.add_get("/api/preferences", self.api_get)
        app.router.add_put("/api/preferences", self.api_put)
        app.router.add_route("OPTIONS", "/api/preferences", self.api_preflight)

    # --- the page -------------------------------------------------------------------------------

    def _link(self, request: web.Request) -> tuple[str, str] | web.Response:
        """(token, user) of a valid link, or the 400 page."""
        if self.link_key is None:
            raise web.HTTPNotFound()
        token = request.query.get("token", "")
        try:
            link = read_token(self.link_key, token, int(self.clock()))
        except LinkInvalid as exc:
            return broken(str(exc))
        return token, link.user_id

    async def _view(self, user: str) -> dict[str, Any] | None:
        store = self.store()
        if store is None:
            return None
        try:
            return await store.preferences_of(user)
        except DB_ERRORS:
            return None

    async def show(self, request: web.Request) -> web.Response:
        """GET/HEAD: the form. Changes nothing."""
        found = self._link(request)
        if isinstance(found, web.Response):
            return found
        token, user = found
        view = await self._view(user)
        if view is None:
            return unavailable()
        assert self.link_key is not None
        note = ""
        if request.query.get("saved") == "1":
            note = '<p class="ok" role="status">Your preferences are saved.</p>'
        csrf = make_csrf(self.link_key, token, int(self.clock()))
        return page("Your notification preferences", render_form(view, token, csrf, note))

    async def save(self, request: web.Request) -> web.StreamResponse:
        """POST: the form; applies it and redirects to the page (303), or says what is wrong."""
        found = self._link(request)
        if isinstance(found, web.Response):
            return found
        token, user = found
        assert self.link_key is not None
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            return broken("the form was sent from another site", 403)
        if request.content_type not in FORM_TYPES:
            return broken("the request is not a form")
        try:
            form = await request.post()
        except web.HTTPException:
            raise
        except Exception:  # any body the form parsers refuse is the sender's fault: 400
            return broken("the form cannot be read")
        if not csrf_ok(self.link_key, token, str(form.get("csrf", "")), int(self.clock())):
            return broken("the form is too old or did not come from this page; reload it", 403)
        view = await self._view(user)
        store = self.store()
        if view is None or store is None:
            return unavailable()
        shown = [str(v) for v in form.getall("shown", [])]
        checked = [str(v) for v in form.getall("on", [])]
        try:
            changes = form_changes(view, shown, checked, form)
            count = await store.save_preferences(user, changes, PAGE_SOURCE)
        except PreferenceRejected as exc:
            csrf = make_csrf(self.link_key, token, int(self.clock()))
            note = f'<p class="err" role="alert">Not saved: {e(exc)}.</p>'
            return page("Your notification preferences", render_form(view, token, csrf, note), 400)
        except DB_ERRORS:
            return unavailable()
        log.info(
            "preference centre: %s change(s) saved",
            count,
            extra={"action": "preferences_saved", "source": PAGE_SOURCE},
        )
        raise web.HTTPSeeOther(location=f"?token={quote(token, safe='')}&saved=1")

    # --- the API --------------------------------------------------------------------------------

    def _cors(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin", "").lower()
        if origin in self.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    def _json(self, request: web.Request, body: Any, status: int = 200) -> web.StreamResponse:
        return self._cors(request, web.json_response(body, status=status))

    def _user(self, request: web.Request) -> str | web.StreamResponse:
        """The token's user, or 401 (404 while app tokens are not configured)."""
        if self.app_secret is None:
            raise web.HTTPNotFound()
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            why = "send Authorization: Bearer <user token>"
        else:
            try:
                return app_tokens.verify(
                    self.app_secret,
                    token.strip(),
                    int(self.clock()),
                    max_lifetime_seconds=self.app_max_lifetime,
                    audience=self.app_audience,
                ).user_id
            except AppTokenError as exc:
                why = str(exc)
        response = self._json(request, {"error": why}, 401)
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return response

    async def api_preflight(self, request: web.Request) -> web.StreamResponse:
        if self.app_secret is None:
            raise web.HTTPNotFound()
        response = web.Response(status=204)
        if request.headers.get("Origin", "").lower() in self.cors_origins:
            response.headers["Access-Control-Allow-Methods"] = "GET, PUT"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        return self._cors(request, response)

    async def api_get(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        if not isinstance(user, str):
            return user
        view = await self._view(user)
        if view is None:
            return self._json(request, {"error": "database unavailable"}, 503)
        return self._json(request, view)

    async def api_put(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        if not isinstance(user, str):
            return user
        if request.content_length is not None and request.content_length > MAX_API_BODY:
            return self._json(request, {"error": "body too large"}, 413)
        raw = await request.read()  # the server's own limit (1 MiB) answers 413 beyond it
        if len(raw) > MAX_API_BODY:
            return self._json(request, {"error": "body too large"}, 413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return self._json(request, {"error": "the body is not JSON"}, 400)
        store = self.store()
        if store is None:
            return self._json(request, {"error": "database unavailable"}, 503)
        try:
            count = await store.save_preferences(user, api_changes(body), API_SOURCE)
        except PreferenceRejected as exc:
            return self._json(request, {"error": str(exc), "field": exc.field}, 422)
        except DB_ERRORS:
            return self._json(request, {"error": "database unavailable"}, 503)
        view = await self._view(user)
        if view is None:
            return self._json(request, {"error": "database unavailable"}, 503)
        return self._json(request, {**view, "changed": count})
