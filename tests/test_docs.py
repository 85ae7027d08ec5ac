"""The README stays true: its settings table is the generated one; every variable it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from pgnotify_worker.config import ENV_PREFIX, Settings, settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_is_the_generated_one() -> None:
    block = README.split("<!-- settings:start", 1)[1].split("-->", 1)[1]
    table = block.split("<!-- settings:end -->", 1)[0].strip()
    assert table == settings_table(), "run: python -m pgnotify_worker.config, paste into README.md"


def test_every_variable_the_docs_name_exists() -> None:
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known |= {"PGNOTIFY_TEST_DSN", "PGNOTIFY_TEST_PGBIN"}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named = set(re.findall(r"PGNOTIFY_[A-Z_]+[A-Z]", doc.read_text()))
        assert named <= known, f"{doc.name} names unknown settings: {sorted(named - known)}"


def test_changelog_has_an_entry_for_this_version() -> None:
    from pgnotify_worker import __version__

    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()
