"""A real headless browser for the page tests: Playwright for Python driving Debian's `chromium`
package (`make browser` installs it as root; elsewhere install it yourself and/or point
PGNOTIFY_CHROMIUM at a Chromium binary).

Without a Chromium the browser tests skip, unless PGNOTIFY_REQUIRE_BROWSER=1 (CI sets it), in which
case they fail: a page test that silently skipped would prove nothing.

Screenshots go to test-artifacts/screenshots/<name>.png (git-ignored), for people to look at."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str | None:
    """The Chromium binary to drive: PGNOTIFY_CHROMIUM, else the first on PATH."""
    given = os.environ.get("PGNOTIFY_CHROMIUM")
    if given:
        return given
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The binary, or skip (fail under PGNOTIFY_REQUIRE_BROWSER=1) saying what is missing."""
    why = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (it is in the dev extra: make test installs it)"
    path = chromium_path()
    if why is None and path is None:
        why = "no Chromium found: `make browser` (as root, Debian) or set PGNOTIFY_CHROMIUM"
    if why is not None:
        if os.environ.get("PGNOTIFY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but {why}")
        pytest.skip(why)
    assert path is not None
    return path


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for one test (closed afterwards, whatever happens)."""
    from playwright.async_api import async_playwright

    path = require_browser()
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=path,
            headless=True,
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def page(**context_options: object) -> AsyncIterator[Page]:
    """A fresh browser context (its own cookies) and page; 10 s default timeouts."""
    async with browser() as b:
        context = await b.new_context(**context_options)  # type: ignore[arg-type]
        context.set_default_timeout(10_000)
        try:
            p = await context.new_page()
            yield p
        finally:
            await context.close()


async def screenshot(p: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artefact and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / f"{name}.png"
    await p.screenshot(path=str(target), full_page=True)
    return target
