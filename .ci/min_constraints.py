"""Print pip constraints pinning every runtime dependency to its declared minimum (`>=X` -> `==X`),
so `make min-deps` proves the minimums in pyproject.toml are enough."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def constraints(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for requirement in project["dependencies"]:
        match = PIN.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} declares no minimum (name>=version)")
        lines.append(f"{match.group(1)}=={match.group(3)}")
    return lines


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    sys.stdout.write("\n".join(constraints(root / "pyproject.toml")) + "\n")
