"""OpenTelemetry: a span per claim batch and per send; the producer's trace continues."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pgnotify_worker.config import Settings
from tests.support.db import wait_rows
from tests.support.webhooks import WebhookSink
from tests.support.worker import running

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """One SDK provider for the process (OpenTelemetry allows setting it once)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    return memory


async def test_the_delivery_continues_the_producers_trace(
    exporter: InMemorySpanExporter,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    exporter.clear()
    nid = await conn.fetchval(
        "SELECT pgnotify.enqueue('webhook', $1, traceparent => $2)",
        webhook_sink.url,
        f"00-{TRACE_ID}-{PARENT_ID}-01",
    )
    plain = await conn.fetchval("SELECT pgnotify.enqueue('webhook', $1)", webhook_sink.url)
    async with running(worker_settings()) as service:
        await wait_rows(conn, [nid, plain], {"sent"}, service)
    spans = exporter.get_finished_spans()
    sends = {
        span.attributes["pgnotify.notification_id"]: span
        for span in spans
        if span.name == "pgnotify.send"
    }
    traced, untraced = sends[nid], sends[plain]
    assert format(traced.context.trace_id, "032x") == TRACE_ID
    assert traced.parent is not None and format(traced.parent.span_id, "016x") == PARENT_ID
    assert traced.attributes["pgnotify.outcome"] == "sent"
    assert traced.attributes["pgnotify.provider"] == "webhook"
    assert format(untraced.context.trace_id, "032x") != TRACE_ID  # a trace of its own
    claims = [span for span in spans if span.name == "pgnotify.claim"]
    assert any(span.attributes.get("pgnotify.rows", 0) >= 1 for span in claims)
    # the receiver gets the send span's context, so its own trace joins too
    carried = [r.headers.get("traceparent", "") for r in webhook_sink.requests]
    assert sum(TRACE_ID in header for header in carried) == 1  # the traced notification's request
    assert all(header.startswith("00-") for header in carried)  # every send span is propagated


async def test_tracing_can_be_turned_off(
    exporter: InMemorySpanExporter,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    exporter.clear()
    nid = await conn.fetchval("SELECT pgnotify.enqueue('webhook', $1)", webhook_sink.url)
    async with running(worker_settings(tracing=False)) as service:
        await wait_rows(conn, [nid], {"sent"}, service)
    assert [s for s in exporter.get_finished_spans() if s.name.startswith("pgnotify.")] == []


async def test_a_malformed_traceparent_is_refused_at_insert(conn: asyncpg.Connection) -> None:
    with pytest.raises(
        asyncpg.CheckViolationError, match="traceparent is not a W3C traceparent"
    ) as caught:
        await conn.fetchval(
            "SELECT pgnotify.enqueue('webhook', 'https://example.com', traceparent => 'nope')"
        )
    assert caught.value.column_name == "traceparent"
