"""The command line run as an operator runs it: `python -m pgnotify_worker ...` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

from pgnotify_worker.adapters.migrate import load_migrations

ALL_VERSIONS = ", ".join(f"{m.version:04d}" for m in load_migrations())


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGNOTIFY_")}
    return subprocess.run(
        [sys.executable, "-m", "pgnotify_worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )
