"""The one exception hierarchy of pgnotify-worker."""

from __future__ import annotations


class PgnotifyError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PgnotifyError):
    """A setting is missing or unusable; the message says which and how to fix it."""


class SchemaVersionError(PgnotifyError):
    """The database schema is older than this code needs."""

    def __init__(self, found: int, needed: int) -> None:
        self.found = found
        self.needed = needed
        super().__init__(
            f"the database schema is at version {found}, this worker needs {needed}: "
            "run `pgnotify-worker migrate` (or apply schema/*.sql with psql)"
        )


class TemplateError(PgnotifyError):
    """A template cannot be found or rendered; the notification fails permanently."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class ProviderConfigError(PgnotifyError):
    """A provider cannot start (missing credential, bad setting)."""
