"""`python -m tests.support.module_probe run`: the worker's own CLI, then, once it has exited,
one line on stdout naming every module the process had imported (MODULES <json list>)."""

from __future__ import annotations

import json
import sys

from pgnotify_worker.cli import main

if __name__ == "__main__":
    try:
        code = main()
    finally:
        print("MODULES " + json.dumps(sorted(sys.modules)), flush=True)
    raise SystemExit(code)
