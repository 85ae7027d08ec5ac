"""Routes, pages and actions of the console (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import jinja2
from aiohttp import web

from pgnotify_worker import __version__
from pgnotify_worker.adapters import queries
from pgnotify_worker.adapters.console.auth import (
    LoginLimiter,
    Password,
    Role,
    Session,
    Sessions,
    session_key,
)
from pgnotify_worker.adapters.db import DB_ERRORS
from pgnotify_worker.core.redact import mask_email, mask_phone, mask_recipient, mask_token
from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.errors import PgnotifyError

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
COOKIE = "pgnotify_console"
LOGIN_COOKIE = "pgnotify_console_login"  # the login form's pre-session nonce (its CSRF token)
PAGE_SIZE = 50
BULK_MAX = 50_000  # rows one bulk action may touch (narrow the filter beyond that)
STATUSES = (
    "scheduled",
    "queued",
    "processing",
    "held",
    "sent",
    "failed",
    "dead",
    "cancelled",
    "skipped",
    "digested",
    "expired",
)
CHANNELS = ("email", "sms", "push", "webhook", "inapp")
MAX_SSE_CLIENTS = 8
SSE_LIFETIME = 600.0  # seconds; EventSource reconnects by itself
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}

Pool = asyncpg.Pool
CircuitsFn = Callable[[], list[dict[str, Any]]]


class Refused(PgnotifyError):
    """A request the console turns down (status and message for the page)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _int(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit() or len(value.strip()) > 18:
        return None
    return int(value.strip())


def _clean(value: str | None, allowed: tuple[str, ...] | None = None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if allowed is not None and value not in allowed:
        return None
    return value[:500]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


class Console:
    """The console's routes; `pool()` gives the worker's pool once it is connected."""

    def __init__(
        self,
        admin: Password,
        viewer: Password | None,
        *,
        pool: Callable[[], Pool | None],
        listen_dsn: str | None,
        circuits: CircuitsFn = list,
        scrub: Callable[[str], str] = lambda text: text,
        session_secret: str | None = None,
        session_hours: float = 12.0,
        trusted_proxies: list[str] | None = None,
        limiter: LoginLimiter | None = None,
    ) -> None:
        for password in (admin, viewer):
            if password is not None:
                password.check_available()
        self.admin = admin
        self.viewer = viewer
        self.pool = pool
        self.listen_dsn = listen_dsn
        self.circuits = circuits
        self.scrub = scrub
        passwords = [admin] + ([viewer] if viewer else [])
        self.sessions = Sessions(session_key(passwords, session_secret), session_hours * 3600)
        self.proxies = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies or []]
        self.limiter = limiter or LoginLimiter()
        self.renderer = Renderer()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # nothing from a payload or a provider is ever rendered unescaped
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["ago"] = _ago
        self.env.filters["ts"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S") if v else "-"
        self.env.globals["version"] = __version__
        self.static_hashes = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in STATIC.iterdir()
            if p.is_file()
        }
        self.env.globals["static"] = self._static_url
        self._stopping = asyncio.Event()
        self._sse_clients = 0

    def _static_url(self, name: str) -> str:
        return f"/console/static/{name}?v={self.static_hashes.get(name, '0')}"

    # --- wiring ---

    def routes(self, app: web.Application) -> None:
        """Add the console to the worker's application (an `extra_routes` adder)."""
        app.middlewares.append(self._middleware)
        app.on_shutdown.append(self._on_shutdown)
        r = app.router
        r.add_get("/console", self._to_root)
        r.add_get("/console/login", self.login_page)
        r.add_post("/console/login", self.login)
        r.add_post("/console/logout", self.logout)
        r.add_get("/console/static/{name}", self.static)
        r.add_get("/console/", self.overview)
        r.add_get("/console/events", self.events)
        r.add_get("/console/notifications", self.notifications)
        r.add_get(r"/console/notifications/{id:\d+}", self.notification)
        r.add_post(r"/console/notifications/{id:\d+}/retry", self.retry)
        r.add_post(r"/console/notifications/{id:\d+}/cancel", self.cancel)
        r.add_post("/console/bulk", self.bulk)
        r.add_post("/console/channels/{channel}/{action:pause|resume}", self.channel_action)
        r.add_post("/console/jobs/{name}/run", self.run_job)
        r.add_get("/console/dead-letters", self.dead_letters)
        r.add_post("/console/dead-letters/retry", self.dead_letters_retry)
        r.add_get("/console/templates", self.templates)
        r.add_get("/console/templates/{key}", self.template)
        r.add_get("/console/recipients", self.recipients)

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._stopping.set()  # live streams end, so the server stops without waiting on them

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/console"):
            return await handler(request)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Refused as exc:
            response = self._page(
                request, "error.html", {"status": exc.status, "message": exc.message}, exc.status
            )
        except web.HTTPException as exc:
            if exc.status >= 400:
                exc.headers.update(SECURITY_HEADERS)
            raise
        except DB_ERRORS as exc:
            log.warning(
                "console: database error: %s",
                type(exc).__name__,
                extra={"action": "console_db_error"},
            )
            response = self._page(
                request,
                "error.html",
                {"status": 503, "message": f"The database did not answer ({type(exc).__name__})."},
                503,
            )
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            # the server's own time for the page (bench/console.py reads it)
            took = (time.perf_counter() - started) * 1000
            response.headers["Server-Timing"] = f"app;dur={took:.1f}"
        return response

    # --- helpers ---

    def client(self, request: web.Request) -> str:
        """The client address: the TCP peer, or X-Forwarded-For's last untrusted hop when the peer
        is a trusted proxy."""
        peer = request.remote or "unknown"
        if not self.proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self._trusted(hop):
                return hop
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def https(self, request: web.Request) -> bool:
        if request.secure:
            return True
        if self.proxies and self._trusted(request.remote or ""):
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            return proto == "https"
        return False

    def session(self, request: web.Request) -> Session | None:
        return self.sessions.read(request.cookies.get(COOKIE))

    def need(self, request: web.Request, *, admin: bool = False) -> Session:
        """The session, or a redirect to the login page; admin actions refuse a viewer (403)."""
        session = self.session(request)
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther("/console/login", headers=SECURITY_HEADERS)
            raise Refused(403, "Not logged in (or the session expired): log in again.")
        if admin and session.role != "admin":
            raise Refused(403, "This action needs the admin login; the viewer login is read-only.")
        return session

    async def need_post(self, request: web.Request, *, admin: bool = True) -> tuple[Session, Any]:
        """A logged-in POST with a valid CSRF token; returns the session and the form."""
        session = self.need(request, admin=False)
        form = await request.post()
        token = form.get("csrf")
        if not self.sessions.csrf_ok(session.nonce, token if isinstance(token, str) else None):
            raise Refused(403, "Missing or wrong CSRF token: reload the page and try again.")
        if admin and session.role != "admin":
            raise Refused(403, "This action needs the admin login; the viewer login is read-only.")
        return session, form

    def who(self, request: web.Request, session: Session) -> tuple[str, dict[str, Any]]:
        """(events.worker, events.detail) of an admin action: role and client address."""
        client = self.client(request)
        return f"console:{session.role}@{client}", {
            "by": session.role,
            "client": client,
            "via": "console",
        }

    def db(self) -> Pool:
        pool = self.pool()
        if pool is None:
            raise Refused(503, "The worker is not connected to the database yet.")
        return pool

    def _page(
        self,
        request: web.Request,
        name: str,
        context: Mapping[str, Any],
        status: int = 200,
        session: Session | None = None,
    ) -> web.Response:
        session = session or self.session(request)
        html = self.env.get_template(name).render(
            **context,
            session=session,
            admin=session is not None and session.role == "admin",
            csrf=self.sessions.csrf(session.nonce) if session else "",
            path=request.path,
        )
        return web.Response(text=html, content_type="text/html", status=status)

    def mask(self, session: Session, channel: str, address: str | None) -> str | None:
        if address is None or session.role == "admin":
            return address
        return mask_recipient(channel, address)

    # --- login ---

    async def _to_root(self, _request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/console/")

    async def login_page(
        self, request: web.Request, error: str | None = None, status: int = 200
    ) -> web.Response:
        if error is None and self.session(request) is not None:
            raise web.HTTPSeeOther("/console/")
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        if len(nonce) < 16 or len(nonce) > 64:
            nonce = os.urandom(16).hex()
        response = self._page(
            request,
            "login.html",
            {"error": error, "login_csrf": self.sessions.csrf("login:" + nonce)},
            status,
        )
        self._cookie(request, response, LOGIN_COOKIE, nonce, 3600)
        return response

    def _cookie(
        self,
        request: web.Request,
        response: web.StreamResponse,
        name: str,
        value: str,
        max_age: float,
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=int(max_age),
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=self.https(request),
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        client = self.client(request)
        wait = self.limiter.retry_after(client)
        if wait > 0:
            response = await self.login_page(
                request, f"Too many login attempts: try again in {wait:.0f} seconds.", 429
            )
            response.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
            return response
        form = await request.post()
        nonce = request.cookies.get(LOGIN_COOKIE)
        token = form.get("csrf")
        if not nonce or not self.sessions.csrf_ok(
            "login:" + nonce, token if isinstance(token, str) else None
        ):
            return await self.login_page(request, "The login form expired: please try again.", 403)
        given = form.get("password")
        given = given if isinstance(given, str) else ""
        role: Role | None = None
        if given and len(given) <= 1024:
            if await asyncio.to_thread(self.admin.verify, given):
                role = "admin"
            elif self.viewer is not None and await asyncio.to_thread(self.viewer.verify, given):
                role = "viewer"
        if role is None:
            self.limiter.record(client)
            log.warning(
                "console: failed login from %s", client, extra={"action": "console_login_failed"}
            )
            return await self.login_page(request, "Wrong password.", 401)
        cookie, _session = self.sessions.issue(role)
        log.info("console: %s logged in from %s", role, client, extra={"action": "console_login"})
        response = web.Response(status=303, headers={"Location": "/console/"})
        self._cookie(request, response, COOKIE, cookie, self.sessions.lifetime)
        response.del_cookie(LOGIN_COOKIE, path="/console")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        await self.need_post(request, admin=False)
        response = web.Response(status=303, headers={"Location": "/console/login"})
        response.del_cookie(COOKIE, path="/console")
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.static_hashes:
            raise web.HTTPNotFound()
        kind = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}.get(
            Path(name).suffix, "application/octet-stream"
        )
        response = web.Response(body=(STATIC / name).read_bytes(), content_type=kind)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "public, max-age=86400"
        return response

    # --- overview ---

    async def overview_data(self, session: Session) -> dict[str, Any]:
        async with self.db().acquire() as conn:
            queue = [dict(r) for r in await conn.fetch(queries.QUEUE_STATUS)]
            paused = {r["channel"]: dict(r) for r in await conn.fetch(queries.CONSOLE_PAUSED)}
            per_minute = {r["minutes_ago"]: r for r in await conn.fetch(queries.CONSOLE_THROUGHPUT)}
            workers = [dict(r) for r in await conn.fetch(queries.CONSOLE_WORKERS)]
            limits = [dict(r) for r in await conn.fetch(queries.PROVIDER_LIMITS)]
            destinations = [dict(r) for r in await conn.fetch(queries.CONSOLE_DESTINATIONS)]
            jobs = [dict(r) for r in await conn.fetch(queries.CONSOLE_JOBS)]
            workflows = dict(await conn.fetchrow(queries.WORKFLOW_STATUS) or {})
        for row in queue:
            row["paused"] = paused.get(row["channel"])
        for row in limits:
            row["pause_reason"] = self.scrub(row["pause_reason"] or "") or None
        for row in destinations:
            row["last_error"] = self.scrub(row["last_error"] or "")
            row["disabled_reason"] = self.scrub(row["disabled_reason"] or "") or None
            if session.role != "admin":
                row["origin"] = row["origin"].split("://", 1)[0] + "://…"
        for row in jobs:
            row["error"] = self.scrub(row["error"] or "") or None
        minutes = [
            (
                m,
                int(per_minute[m]["sent"]) if m in per_minute else 0,
                int(per_minute[m]["failed"]) if m in per_minute else 0,
            )
            for m in range(59, -1, -1)
        ]
        return {
            "queue": queue,
            "chart": chart(minutes),
            "sent_hour": sum(s for _, s, _ in minutes),
            "failed_hour": sum(f for _, _, f in minutes),
            "workers": workers,
            "limits": limits,
            "destinations": destinations,
            "jobs": jobs,
            "workflows": workflows,
            "circuits": self.circuits(),
        }

    async def overview(self, request: web.Request) -> web.Response:
        session = self.need(request)
        data = await self.overview_data(session)
        name = "overview_live.html" if request.query.get("fragment") == "1" else "overview.html"
        return self._page(request, name, data, session=session)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `change` when a NOTIFY on pgnotify arrives (at most one a second),
        `tick` every 5 s (completions send no NOTIFY), so the overview refreshes itself."""
        session = self.need(request)
        if self._sse_clients >= MAX_SSE_CLIENTS or not self.listen_dsn:
            raise Refused(503, "Too many live views open; the page still works by reloading.")
        self._sse_clients += 1
        conn: asyncpg.Connection | None = None
        try:
            changed = asyncio.Event()
            with contextlib.suppress(*DB_ERRORS):
                conn = await asyncpg.connect(self.listen_dsn, timeout=10)
                await conn.add_listener("pgnotify", lambda *_args: changed.set())
            response = web.StreamResponse(
                headers={
                    **SECURITY_HEADERS,
                    "Content-Type": "text/event-stream",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            await response.write(b"retry: 3000\n\n")
            ends = time.monotonic() + SSE_LIFETIME
            with contextlib.suppress(ConnectionResetError):  # the page went away
                await self._stream(response, session, changed, ends)
            return response
        finally:
            self._sse_clients -= 1
            if conn is not None:
                with contextlib.suppress(*DB_ERRORS):
                    await asyncio.wait_for(conn.close(), 5)

    async def _stream(
        self, response: web.StreamResponse, session: Session, changed: asyncio.Event, ends: float
    ) -> None:
        while not self._stopping.is_set() and time.monotonic() < ends:
            if session.expires <= time.time():
                break
            wake = asyncio.ensure_future(changed.wait())
            stop = asyncio.ensure_future(self._stopping.wait())
            _done, pending = await asyncio.wait(
                {wake, stop}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if self._stopping.is_set():
                break
            event = b"change" if changed.is_set() else b"tick"
            changed.clear()
            await response.write(b"event: " + event + b"\ndata: {}\n\n")
            await asyncio.sleep(1.0)  # at most one refresh a second

    # --- notifications ---

    def filters(self, source: Mapping[str, Any]) -> dict[str, str | None]:
        def get(name: str) -> str | None:
            value = source.get(name)
            return value if isinstance(value, str) else None

        return {
            "q": _clean(get("q")),
            "status": _clean(get("status"), STATUSES),
            "channel": _clean(get("channel"), CHANNELS),
            "category": _clean(get("category")),
        }

    @staticmethod
    def filter_args(f: Mapping[str, str | None]) -> tuple[Any, ...]:
        q = f["q"]
        return (f["status"], f["channel"], f["category"], q, _int(q) if q else None)

    async def notifications(self, request: web.Request) -> web.Response:
        session = self.need(request)
        f = self.filters(request.query)
        before = _int(request.query.get("before"))
        async with self.db().acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(queries.CONSOLE_CUSTOM_PLANS)
            rows = [
                dict(r)
                for r in await conn.fetch(
                    queries.CONSOLE_LIST, *self.filter_args(f), before, PAGE_SIZE + 1
                )
            ]
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        for row in rows:
            row["recipient"] = self.mask(session, row["channel"], row["recipient"])
            row["last_error"] = self.scrub(row["last_error"] or "") or None
        query = {k: v for k, v in f.items() if v}
        return self._page(
            request,
            "notifications.html",
            {
                "rows": rows,
                "f": f,
                "query": query,
                "next_before": rows[-1]["id"] if more else None,
                "before": before,
                "statuses": STATUSES,
                "channels": CHANNELS,
            },
            session=session,
        )

    async def notification(self, request: web.Request) -> web.Response:
        session = self.need(request)
        nid = int(request.match_info["id"])
        async with self.db().acquire() as conn:
            row = await conn.fetchrow(queries.CONSOLE_NOTIFICATION, nid)
            if row is None:
                raise Refused(404, f"No notification {nid}.")
            events = [dict(e) for e in await conn.fetch(queries.CONSOLE_EVENTS, nid)]
            template = None
            if row["template"]:
                locales = [row["locale"] or "", (row["locale"] or "").split("-")[0], ""]
                template = await conn.fetchrow(
                    queries.TEMPLATE, row["template"], row["channel"], locales
                )
        n = dict(row)
        rendered, render_error = self.render_notification(n, dict(template) if template else None)
        recipient = n["recipient"]
        if session.role != "admin":
            masked = mask_recipient(n["channel"], recipient)
            n["payload_text"] = n["payload_text"].replace(recipient, masked)
            if rendered:
                rendered = {
                    k: (v.replace(recipient, masked) if v else v) for k, v in rendered.items()
                }
            n["recipient"] = masked
        for event in events:
            event["error"] = self.scrub(event["error"] or "") or None
            event["detail"] = self.scrub(event["detail"] or "") or None
        n["last_error"] = self.scrub(n["last_error"] or "") or None
        try:
            payload = json.dumps(json.loads(n["payload_text"]), indent=2, ensure_ascii=False)
        except ValueError:
            payload = n["payload_text"]
        fields = [
            (k, n[k])
            for k in (
                "id",
                "uid",
                "channel",
                "recipient",
                "user_id",
                "category",
                "template",
                "template_version",
                "locale",
                "priority",
                "status",
                "attempts",
                "max_attempts",
                "run_at",
                "created_at",
                "updated_at",
                "sent_at",
                "expires_at",
                "provider",
                "provider_message_id",
                "idempotency_key",
                "group_id",
                "hold",
                "digest_id",
                "last_error",
            )
            if k in n
        ]
        done = {
            "retry": "Requeued: a worker will send it again.",
            "cancel": "Cancelled.",
            "noop": "Nothing to do: its status has changed.",
        }
        return self._page(
            request,
            "notification.html",
            {
                "n": n,
                "fields": fields,
                "events": events,
                "rendered": rendered,
                "render_error": render_error,
                "payload": self.scrub(
                    payload,
                ),
                "done": done.get(request.query.get("done", "")),
            },
            session=session,
        )

    def render_notification(
        self, n: Mapping[str, Any], template: Mapping[str, Any] | None
    ) -> tuple[dict[str, str | None] | None, str | None]:
        """Subject and bodies as sent (inline content) or as they would be sent (the template's
        newest version rendered in the sandbox with the payload)."""
        parts = TemplateParts(
            subject=n["subject"] if n["subject"] is not None else (template or {}).get("subject"),
            body=n["body"] if n["body"] is not None else (template or {}).get("body"),
            html_body=n["html_body"]
            if n["html_body"] is not None
            else (template or {}).get("html_body"),
        )
        if parts.subject is None and parts.body is None and parts.html_body is None:
            if n["channel"] == "webhook":
                return None, None  # the payload is the request body
            return None, "No content: no inline subject or body, and no stored template found."
        try:
            payload = json.loads(n["payload_text"])
            context = build_context(payload if isinstance(payload, dict) else {})
            out = self.renderer.render(parts, context)
        except (PgnotifyError, ValueError, TypeError) as exc:
            return None, self.scrub(str(exc))
        return {"subject": out.subject, "text": out.text, "html": out.html}, None

    # --- actions ---

    async def retry(self, request: web.Request) -> web.StreamResponse:
        return await self._one(request, queries.CONSOLE_RETRY, "retry")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._one(request, queries.CONSOLE_CANCEL, "cancel")

    async def _one(self, request: web.Request, sql: str, action: str) -> web.StreamResponse:
        session, _form = await self.need_post(request)
        nid = int(request.match_info["id"])
        worker, detail = self.who(request, session)
        row = await self.db().fetchrow(sql, nid, worker, detail)
        log.info(
            "console: %s %s notification %s",
            worker,
            action,
            nid,
            extra={"action": f"console_{action}"},
        )
        outcome = action if row is not None else "noop"
        raise web.HTTPSeeOther(f"/console/notifications/{nid}?done={outcome}")

    async def bulk(self, request: web.Request) -> web.Response:
        """Step 1 (no max_id): preview how many rows the action would touch; step 2: act on the
        rows matching the filter with ids up to the previewed highest, nothing newer."""
        session, form = await self.need_post(request)
        action = form.get("action")
        if action not in ("retry", "cancel"):
            raise Refused(400, "Unknown bulk action.")
        f = self.filters(form)
        args = self.filter_args(f)
        eligible = ["failed", "dead"] if action == "retry" else ["queued", "scheduled", "held"]
        max_id = _int(form.get("max_id") if isinstance(form.get("max_id"), str) else None)
        query = {k: v for k, v in f.items() if v}
        if max_id is None:
            async with self.db().acquire() as conn, conn.transaction(readonly=True):
                await conn.execute(queries.CONSOLE_CUSTOM_PLANS)
                preview = await conn.fetchrow(
                    queries.CONSOLE_BULK_PREVIEW, *args, eligible, BULK_MAX
                )
            assert preview is not None
            return self._page(
                request,
                "bulk.html",
                {
                    "action": action,
                    "f": f,
                    "query": query,
                    "rows": preview["rows"],
                    "max_id": preview["max_id"],
                    "too_many": preview["rows"] > BULK_MAX,
                    "limit": BULK_MAX,
                    "done": None,
                },
                session=session,
            )
        worker, detail = self.who(request, session)
        detail = {**detail, "bulk": True, "filter": query, "max_id": max_id}
        sql = queries.CONSOLE_BULK_RETRY if action == "retry" else queries.CONSOLE_BULK_CANCEL
        async with self.db().acquire() as conn, conn.transaction():
            await conn.execute(queries.CONSOLE_CUSTOM_PLANS)
            done = await conn.fetchval(sql, *args, max_id, worker, detail)
        log.info(
            "console: %s bulk %s of %s rows",
            worker,
            action,
            done,
            extra={"action": f"console_bulk_{action}"},
        )
        return self._page(
            request,
            "bulk.html",
            {
                "action": action,
                "f": f,
                "query": query,
                "rows": done,
                "max_id": max_id,
                "too_many": False,
                "limit": BULK_MAX,
                "done": done,
            },
            session=session,
        )

    async def channel_action(self, request: web.Request) -> web.StreamResponse:
        session, form = await self.need_post(request)
        channel = request.match_info["channel"]
        if channel not in CHANNELS:
            raise Refused(404, "Unknown channel.")
        action = request.match_info["action"]
        worker, detail = self.who(request, session)
        reason = form.get("reason")
        async with self.db().acquire() as conn, conn.transaction():
            if action == "pause":
                await conn.fetchval(
                    queries.CONSOLE_PAUSE,
                    channel,
                    (reason if isinstance(reason, str) else "")[:200] or None,
                    worker,
                )
            else:
                await conn.fetchval(queries.CONSOLE_RESUME, channel, worker)
            await conn.execute(
                queries.CONSOLE_AUDIT,
                f"channel_{action}d",
                worker,
                {**detail, "channel": channel},
            )
        raise web.HTTPSeeOther("/console/")

    async def run_job(self, request: web.Request) -> web.StreamResponse:
        session, _form = await self.need_post(request)
        name = request.match_info["name"]
        worker, detail = self.who(request, session)
        async with self.db().acquire() as conn, conn.transaction():
            found = await conn.fetchval(queries.CONSOLE_RUN_JOB, name)
            if found is None:
                raise Refused(404, "No enabled job of that name.")
            await conn.execute(
                queries.CONSOLE_AUDIT,
                "job_run_requested",
                worker,
                {**detail, "job": name},
            )
        raise web.HTTPSeeOther("/console/")

    # --- dead letters ---

    async def dead_letters(self, request: web.Request) -> web.Response:
        session = self.need(request)
        rows = [dict(r) for r in await self.db().fetch(queries.CONSOLE_DEAD_LETTERS)]
        for row in rows:
            row["shown_error"] = self.scrub(row["error"]) or "(no error recorded)"
        return self._page(
            request,
            "dead_letters.html",
            {"groups": rows, "done": _int(request.query.get("retried"))},
            session=session,
        )

    async def dead_letters_retry(self, request: web.Request) -> web.StreamResponse:
        session, form = await self.need_post(request)
        channel, error = form.get("channel"), form.get("error")
        max_id = _int(form.get("max_id") if isinstance(form.get("max_id"), str) else None)
        if channel not in CHANNELS or not isinstance(error, str) or max_id is None:
            raise Refused(400, "Incomplete form.")
        worker, detail = self.who(request, session)
        detail = {**detail, "bulk": True, "error_group": True}
        row = await self.db().fetchrow(
            queries.CONSOLE_RETRY_ERROR, channel, error, max_id, worker, detail
        )
        count = row["rows"] if row else 0
        raise web.HTTPSeeOther(f"/console/dead-letters?retried={count}")

    # --- templates ---

    async def templates(self, request: web.Request) -> web.Response:
        session = self.need(request)
        rows = await self.db().fetch(queries.CONSOLE_TEMPLATES)
        return self._page(request, "templates.html", {"rows": rows}, session=session)

    async def template(self, request: web.Request) -> web.Response:
        session = self.need(request)
        key = request.match_info["key"]
        versions = [dict(r) for r in await self.db().fetch(queries.CONSOLE_TEMPLATE_VERSIONS, key)]
        if not versions:
            raise Refused(404, "No template with that key.")
        pick = request.query.get("v", "")
        chosen = next(
            (v for v in versions if f"{v['channel']}/{v['locale']}/{v['version']}" == pick),
            versions[0],
        )
        sample = request.query.get("payload", "")
        preview, error = None, None
        if "payload" in request.query:
            try:
                payload = json.loads(sample or "{}")
                if not isinstance(payload, dict):
                    raise ValueError("the sample payload must be a JSON object")
                parts = TemplateParts(chosen["subject"], chosen["body"], chosen["html_body"])
                out = self.renderer.render(parts, build_context(payload))
                preview = {"subject": out.subject, "text": out.text, "html": out.html}
            except (PgnotifyError, ValueError, TypeError) as exc:
                error = self.scrub(str(exc))
        return self._page(
            request,
            "template.html",
            {
                "key": key,
                "versions": versions,
                "chosen": chosen,
                "sample": sample,
                "pick": f"{chosen['channel']}/{chosen['locale']}/{chosen['version']}",
                "preview": preview,
                "error": error,
            },
            session=session,
        )

    # --- recipients ---

    async def recipients(self, request: web.Request) -> web.Response:
        session = self.need(request)
        user = _clean(request.query.get("user"))
        context: dict[str, Any] = {"user": user, "found": False}
        if user:
            async with self.db().acquire() as conn:
                contact = await conn.fetchrow(queries.CONSOLE_CONTACT, user)
                devices = [dict(r) for r in await conn.fetch(queries.CONSOLE_DEVICES, user)]
                prefs = await conn.fetch(queries.CONSOLE_PREFERENCES, user)
                consents = await conn.fetch(queries.CONSOLE_CONSENTS, user)
                addresses = [
                    a
                    for a in (
                        contact["email"] if contact else None,
                        contact["phone"] if contact else None,
                        contact["webhook_url"] if contact else None,
                    )
                    if a
                ]
                suppressions = [
                    dict(r) for r in await conn.fetch(queries.CONSOLE_SUPPRESSIONS, addresses)
                ]
                async with conn.transaction(readonly=True):
                    await conn.execute(queries.CONSOLE_CUSTOM_PLANS)
                    last = [
                        dict(r)
                        for r in await conn.fetch(
                            queries.CONSOLE_LIST, None, None, None, user, None, None, 20
                        )
                    ]
            c = dict(contact) if contact else None
            if c and session.role != "admin":
                c["email"] = mask_email(c["email"]) if c["email"] else None
                c["phone"] = mask_phone(c["phone"]) if c["phone"] else None
                c["webhook_url"] = (
                    mask_recipient("webhook", c["webhook_url"]) if c["webhook_url"] else None
                )
            for d in devices:
                d["token"] = mask_token(d["token"])  # a push token is a credential: never whole
            for s in suppressions:
                s["address"] = self.mask(session, s["channel"], s["address"])
            for n in last:
                n["recipient"] = self.mask(session, n["channel"], n["recipient"])
                n["last_error"] = self.scrub(n["last_error"] or "") or None
            context.update(
                found=bool(c or devices or prefs or consents or last),
                contact=c,
                devices=devices,
                prefs=prefs,
                consents=consents,
                suppressions=suppressions,
                last=last,
            )
        return self._page(request, "recipients.html", context, session=session)


def chart(minutes: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Bars for an inline SVG (no script needed): sent above, failed in red, per minute."""
    width, height, bar = 600, 120, 10
    top = max([s + f for _, s, f in minutes] + [1])
    bars = []
    for i, (ago, sent, failed) in enumerate(minutes):
        h_sent = round(sent / top * (height - 14), 1)
        h_failed = round(failed / top * (height - 14), 1)
        x = i * bar
        bars.append(
            {
                "x": x,
                "w": bar - 2,
                "ago": ago,
                "sent": sent,
                "failed": failed,
                "y_sent": height - h_sent - h_failed,
                "h_sent": h_sent,
                "y_failed": height - h_failed,
                "h_failed": h_failed,
            }
        )
    return {"width": width, "height": height, "bars": bars, "top": top}


def console_from_settings(
    settings: Any,
    *,
    pool: Callable[[], Pool | None],
    listen_dsn: str | None,
    circuits: CircuitsFn = list,
    scrub: Callable[[str], str] = lambda text: text,
) -> Console | None:
    """The console when PGNOTIFY_CONSOLE_ADMIN_PASSWORD is set (else None)."""
    admin = settings.console_admin_password
    if admin is None or not admin.get_secret_value():
        return None
    viewer = settings.console_viewer_password
    secret = settings.console_session_secret
    return Console(
        Password("PGNOTIFY_CONSOLE_ADMIN_PASSWORD", admin.get_secret_value()),
        Password("PGNOTIFY_CONSOLE_VIEWER_PASSWORD", viewer.get_secret_value())
        if viewer is not None and viewer.get_secret_value()
        else None,
        pool=pool,
        listen_dsn=listen_dsn,
        circuits=circuits,
        scrub=scrub,
        session_secret=secret.get_secret_value() if secret else None,
        session_hours=settings.console_session_hours,
        trusted_proxies=list(settings.console_trusted_proxies),
    )
