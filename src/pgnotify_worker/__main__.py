"""Allow `python -m pgnotify_worker`."""

from __future__ import annotations

from pgnotify_worker.cli import main

raise SystemExit(main())
