"""Optional OpenTelemetry tracing: a span per claim batch and per send, continuing the producer's
trace from the row's traceparent. Uses only the OpenTelemetry API (the `tracing` extra); where the
spans go is the SDK's business (e.g. `opentelemetry-instrument pgnotify-worker run`). Without the
API installed, or with PGNOTIFY_TRACING=false, every call here is a no-op."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

from pgnotify_worker import __version__
from pgnotify_worker.models import Notification

try:
    from opentelemetry import propagate, trace
except ImportError:  # the tracing extra is not installed
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]


class Tracing:
    """The worker's spans; a no-op when disabled or when OpenTelemetry is absent."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and trace is not None
        self._tracer: Any = (
            trace.get_tracer("pgnotify-worker", __version__) if self.enabled else None
        )

    @contextlib.contextmanager
    def claim(self, channel: str) -> Iterator[Any]:
        """Around one claim statement; the caller may set `rows` on the yielded span."""
        if not self.enabled:
            yield None
            return
        with self._tracer.start_as_current_span(
            "pgnotify.claim", kind=trace.SpanKind.CONSUMER, attributes={"pgnotify.channel": channel}
        ) as span:
            yield span

    @contextlib.contextmanager
    def send(self, n: Notification) -> Iterator[Any]:
        """Around one delivery; its parent is the producer's span when the row carries one."""
        if not self.enabled:
            yield None
            return
        parent = propagate.extract({"traceparent": n.traceparent}) if n.traceparent else None
        with self._tracer.start_as_current_span(
            "pgnotify.send",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "pgnotify.notification_id": n.id,
                "pgnotify.channel": n.channel,
                "pgnotify.attempt": n.attempt,
            },
        ) as span:
            yield span

    @staticmethod
    def annotate(span: Any, **attributes: Any) -> None:
        """Attributes known at the end (outcome, provider); None values are left out."""
        if span is not None:
            for key, value in attributes.items():
                if value is not None:
                    span.set_attribute(f"pgnotify.{key}", value)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's traceparent to outgoing headers (webhooks), when tracing."""
    if propagate is not None:
        propagate.inject(headers)
