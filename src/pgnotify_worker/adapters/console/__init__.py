"""The admin console at /console/: server-rendered pages (Jinja2, autoescaped) over the worker's
pool, served by the worker's own HTTP server. Off unless PGNOTIFY_CONSOLE_ADMIN_PASSWORD is set;
its pages (and Jinja2) are imported only then.

Security: signed session cookies (HttpOnly, SameSite=Strict, Secure over HTTPS), a CSRF token on
every POST, login attempts rate-limited, a CSP without inline script, the viewer role read-only
with addresses masked, every admin action an event naming the role and client address."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg

    from pgnotify_worker.adapters.console.app import CircuitsFn, Console

__all__ = ["Console", "console_from_settings"]


def console_from_settings(
    settings: Any,
    *,
    pool: Callable[[], asyncpg.Pool | None],
    listen_dsn: str | None,
    circuits: CircuitsFn = list,
    scrub: Callable[[str], str] = lambda text: text,
) -> Console | None:
    """The console when PGNOTIFY_CONSOLE_ADMIN_PASSWORD is set (else None, nothing imported)."""
    admin = settings.console_admin_password
    if admin is None or not admin.get_secret_value():
        return None
    from pgnotify_worker.adapters.console import app  # noqa: PLC0415

    return app.console_from_settings(
        settings, pool=pool, listen_dsn=listen_dsn, circuits=circuits, scrub=scrub
    )


def __getattr__(name: str) -> Any:
    if name == "Console":
        from pgnotify_worker.adapters.console.app import Console  # noqa: PLC0415

        return Console
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
