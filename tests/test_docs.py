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


def readme_python_after(marker: str) -> str:
    """The first ```python block after `marker` in the README."""
    rest = README.split(marker, 1)[1]
    return rest.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_webhook_verify_snippet_accepts_real_signed_bodies(
    dsn: str, webhook_sink: object, worker_settings: object
) -> None:
    """Run the README's Standard Webhooks snippet on what the worker really sent: a JSON event
    and a text/plain body from a `body` template (which the library's JSON parsing refused)."""
    import asyncpg
    from standardwebhooks.webhooks import WebhookVerificationError

    from tests.support.webhooks import WEBHOOK_SECRET, WebhookSink
    from tests.support.worker import running

    assert isinstance(webhook_sink, WebhookSink)
    snippet = readme_python_after("Verify with any Standard Webhooks library")
    conn = await asyncpg.connect(dsn)
    try:
        async with running(worker_settings()):  # type: ignore[operator]
            await conn.execute(
                "SELECT pgnotify.enqueue('webhook', $1, payload => '{\"order\": 7}')",
                webhook_sink.url + "/json",
            )
            await conn.execute(
                "SELECT pgnotify.enqueue('webhook', $1, body => 'order {{ order }} shipped', "
                "payload => '{\"order\": 7}')",
                webhook_sink.url + "/text",
            )
            await webhook_sink.wait_for(2)
    finally:
        await conn.close()
    got = {}
    for request in webhook_sink.requests:
        scope = {
            "secret": WEBHOOK_SECRET,
            "request_body": request.body,
            "request_headers": {k.lower(): v for k, v in request.headers.items()},
        }
        exec(snippet, scope)
        got[request.path] = scope["event"]
        tampered = {**scope, "request_body": request.body + b" "}
        try:
            exec(snippet, tampered)
        except WebhookVerificationError:
            pass
        else:
            raise AssertionError("the snippet accepted a tampered body")
    assert got["/text"] == "order 7 shipped"
    assert got["/json"]["data"] == {"order": 7}
