"""Stored templates: the best locale (fr-CA, fr, default) and a short cache dropped on change."""

from __future__ import annotations

import time
from collections.abc import Callable

from pgnotify_worker.models import TemplateRow
from pgnotify_worker.ports import DeliveryStore


def locale_chain(locale: str | None) -> list[str]:
    """fr-CA -> [fr-CA, fr, ''] ; None -> ['']."""
    chain: list[str] = []
    if locale:
        tag = locale.replace("_", "-")
        chain.append(tag)
        if locale != tag:
            chain.append(locale)
        language = tag.split("-", 1)[0]
        if language not in chain:
            chain.append(language)
    chain.append("")
    return chain


class TemplateStore:
    """Stored templates with a short cache, dropped at once when pgnotify.templates changes."""

    def __init__(
        self, store: DeliveryStore, ttl: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str, str], tuple[float, TemplateRow | None]] = {}

    def invalidate(self) -> None:
        """Forget everything (NOTIFY 'templates' arrived)."""
        self._cache.clear()

    async def get(self, key: str, channel: str, locale: str | None) -> TemplateRow | None:
        """The best template row for key/channel/locale, or None when none exists."""
        cache_key = (key, channel, locale or "")
        hit = self._cache.get(cache_key)
        now = self.clock()
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self.store.template(key, channel, locale_chain(locale))
        self._cache[cache_key] = (now + self.ttl, row)
        return row
