"""pgnotify-worker: Postgres-native notification delivery."""

from __future__ import annotations

__version__ = "0.1.0"
SCHEMA_VERSION = 30  # the newest schema/NNNN_*.sql this code needs
