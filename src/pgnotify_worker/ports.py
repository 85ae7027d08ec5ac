"""The seams: what the dispatcher and worker need from providers and the queue store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pgnotify_worker.models import Notification, Outcome, RenderedMessage


@runtime_checkable
class Provider(Protocol):
    """Sends one rendered message and classifies the answer. Never raises for a failed send."""

    name: str

    async def start(self) -> None:
        """Open sessions; raise ProviderConfigError when it cannot work."""

    async def close(self) -> None:
        """Release sessions and files."""

    async def send(self, message: RenderedMessage) -> Outcome:
        """Deliver; Sent, Retryable or Permanent."""
        ...


class QueueStoreLike(Protocol):
    """The queue operations the worker loop uses (adapters.db.QueueStore implements it)."""

    worker_id: str

    async def claim(self, channel: str, limit: int, lease_seconds: float) -> list[Notification]:
        """Lease ready rows."""
        ...

    async def complete(self, batch: Sequence[Any]) -> set[int]:
        """Write outcomes, fenced by lease and attempt."""
        ...

    async def heartbeat(self, held: Sequence[tuple[int, int]], lease_seconds: float) -> int:
        """Extend leases."""
        ...

    async def release(self, held: Sequence[tuple[int, int]]) -> dict[str, int]:
        """Hand claims back."""
        ...

    async def reap(self, limit: int = 1000) -> list[tuple[str, int, int]]:
        """Requeue expired leases."""
        ...

    async def promote(self, limit: int = 1000) -> dict[str, int]:
        """Make due scheduled rows ready."""
        ...

    async def next_due(self) -> float | None:
        """Seconds to the next scheduled row."""
        ...
