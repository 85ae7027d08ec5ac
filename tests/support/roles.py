"""Login roles for tests of least privilege: a new LOGIN role in the given groups, dropped after."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

LoginAs = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def login_roles(dsn: str) -> AsyncIterator[LoginAs]:
    """login_as('pgnotify_producer', ...): a new LOGIN role in those groups; returns its DSN."""
    made: list[str] = []
    admin = await asyncpg.connect(dsn)

    async def make(*groups: str) -> str:
        name = f"pgn_test_{uuid.uuid4().hex[:12]}"
        password = secrets.token_hex(16)
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        made.append(name)
        for group in groups:
            await admin.execute(f"GRANT {group} TO {name}")
        parts = urlsplit(dsn)
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    try:
        yield make
    finally:
        for name in made:
            await admin.execute(  # sessions of the role first: DROP ROLE needs none left
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
            )
            await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()
