"""Apply schema/NNNN_*.sql in order under an advisory lock; check the version the code needs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from pgnotify_worker import SCHEMA_VERSION
from pgnotify_worker.adapters import queries
from pgnotify_worker.errors import SchemaVersionError

log = logging.getLogger(__name__)
MIGRATION_LOCK = 7245390117010512  # the key in every schema file's pg_advisory_xact_lock
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema file."""

    version: int
    name: str
    sql: str


def schema_dir() -> Path:
    """The packaged schema files, or the repository's schema/ in a source checkout."""
    packaged = resources.files("pgnotify_worker") / "schema"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "schema"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration, in version order; versions must be 1..n without gaps."""
    directory = directory or schema_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path.read_text("utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"schema files in {directory} are not numbered 1..n: {versions}")
    return found


async def applied_version(conn: asyncpg.Connection) -> int:
    """The newest applied migration, 0 on an empty database."""
    if not await conn.fetchval(queries.SCHEMA_EXISTS):
        return 0
    version: int = await conn.fetchval(queries.SCHEMA_VERSION)
    return version


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what is missing; returns the versions this call applied. Safe with many callers at
    once, and through a transaction pooler: each file is one transaction that takes the migration
    advisory lock (transaction-level, never a session lock) and skips itself, with a NOTICE, when
    another caller applied it first."""
    migrations = migrations if migrations is not None else load_migrations()
    applied = []
    skipped: list[str] = []

    def on_notice(_conn: object, message: object) -> None:
        text = str(getattr(message, "message", ""))
        if text.endswith("is already applied"):
            skipped.append(text)

    current = await applied_version(conn)
    conn.add_log_listener(on_notice)
    try:
        for migration in migrations:
            if migration.version <= current:
                continue
            log.info(
                "applying migration %04d_%s",
                migration.version,
                migration.name,
                extra={"action": "migrate", "version": migration.version},
            )
            skipped.clear()
            await conn.execute(migration.sql)  # the file holds its own BEGIN/COMMIT and lock
            if not skipped:
                applied.append(migration.version)
    finally:
        conn.remove_log_listener(on_notice)
    return applied


async def check_version(conn: asyncpg.Connection, needed: int = SCHEMA_VERSION) -> int:
    """Raise SchemaVersionError when the database is older than this code needs."""
    found = await applied_version(conn)
    if found < needed:
        raise SchemaVersionError(found, needed)
    if found > needed:
        log.warning(
            "database schema is at version %s, newer than this worker's %s; running on "
            "(schema changes add first and remove later)",
            found,
            needed,
            extra={"action": "schema_newer"},
        )
    return found
