"""The embedded PostgreSQL (pgserver) used when no database URL is set."""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgnotify_worker.errors import ConfigError

log = logging.getLogger(__name__)
logging.getLogger("pgserver").setLevel(logging.WARNING)  # its INFO lines are initdb chatter


@dataclass
class EmbeddedPostgres:
    """A running embedded server; stop() ends it when this process was the last user."""

    uri: str
    data_dir: Path
    psql: str
    handle: Any

    def stop(self) -> None:
        """Release our handle (pgserver stops the server when no process uses it)."""
        self.handle.cleanup()


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or attach to) the persistent server whose data lives in data_dir/pgdata."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # noqa: PLC0415 - optional extra, imported only when used
    except ImportError:
        raise ConfigError(
            "PGNOTIFY_DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "pip install 'pgnotify-worker[embedded]', or set PGNOTIFY_DATABASE_URL"
        ) from None
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    log.info("starting embedded PostgreSQL in %s", pgdata, extra={"action": "embedded_start"})
    handle = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    psql = str(bindir / "psql") if (bindir / "psql").exists() else (shutil.which("psql") or "psql")
    return EmbeddedPostgres(uri=handle.get_uri(), data_dir=data_dir, psql=psql, handle=handle)
