"""Read a worker's /metrics until a condition holds (gauges refresh on intervals, a closed client
is noticed at its next write): bounded, never a fixed sleep standing in for the event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp


async def scrape_until(
    http: aiohttp.ClientSession, url: str, done: Callable[[str], bool], timeout: float = 15.0
) -> str:
    """GET `url` (a /metrics page) every 50 ms until `done(text)`; the text that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(url) as response:
            text = await response.text()
        if done(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never got there:\n{text}")
        await asyncio.sleep(0.05)
