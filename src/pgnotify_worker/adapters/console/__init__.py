"""The admin console at /console/: server-rendered pages (Jinja2, autoescaped) over the worker's
pool, served by the worker's own HTTP server. Off unless PGNOTIFY_CONSOLE_ADMIN_PASSWORD is set.

Security: signed session cookies (HttpOnly, SameSite=Strict, Secure over HTTPS), a CSRF token on
every POST, login attempts rate-limited, a CSP without inline script, the viewer role read-only
with addresses masked, every admin action an event naming the role and client address."""

from __future__ import annotations

from pgnotify_worker.adapters.console.app import Console, console_from_settings

__all__ = ["Console", "console_from_settings"]
