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


class StoreError(PgnotifyError):
    """A database call failed; adapters.db raises it so driver exceptions stay in adapters/."""

    def __init__(self, operation: str, cause: BaseException) -> None:
        self.operation = operation
        self.cause_type = type(cause).__name__
        super().__init__(f"{self.cause_type}: {cause}")


class StoreUnavailable(StoreError):
    """The database is unreachable or restarting: retry with back-off."""


class PreferenceRejected(PgnotifyError):
    """A preference change the database refused; `field` names what is wrong."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        super().__init__(message)


class ListenerUnhealthy(PgnotifyError):
    """The LISTEN connection is open but a NOTIFY round trip did not come back."""


class AppTokenError(PgnotifyError):
    """A user token presented to the app-facing APIs is malformed, forged, expired or foreign."""


class TokenError(PgnotifyError):
    """An OAuth token endpoint refused or failed; `refused` when retrying cannot help."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        self.refused = refused
        super().__init__(message)


class ScheduleError(PgnotifyError, ValueError):
    """A cron expression or time zone cannot be used."""


class TargetBlocked(PgnotifyError, OSError):
    """A URL's host resolves only to addresses that deliveries may not reach."""
