"""The worker sets up the OpenTelemetry SDK itself from OTEL_* (the image has the SDK and the
OTLP/HTTP exporter): spans reach a local OTLP/HTTP receiver. In a subprocess, since the SDK's
tracer provider can be set once per process."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from pgnotify_worker.tracing import _exporters

SCRIPT = textwrap.dedent(
    """
    import datetime as dt
    from pgnotify_worker.models import Notification
    from pgnotify_worker.tracing import Tracing, configure_sdk
    tracing = Tracing()  # what the service builds: it configures the SDK from OTEL_*
    print(configure_sdk())
    with tracing.claim("webhook") as span:
        tracing.annotate(span, rows=1)
    """
)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []

    async def traces(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def span_names(self) -> list[str]:
        return [
            span.name
            for req in self.requests
            for resource in req.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def service_names(self) -> set[str]:
        return {
            attr.value.string_value
            for req in self.requests
            for resource in req.resource_spans
            for attr in resource.resource.attributes
            if attr.key == "service.name"
        }


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield found, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def run_script(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def test_spans_reach_an_otlp_http_endpoint(receiver: tuple[Receiver, str]) -> None:
    found, url = receiver
    assert await run_script(OTEL_EXPORTER_OTLP_ENDPOINT=url) == "otlp"
    assert found.span_names() == ["pgnotify.claim"]  # flushed at exit
    assert found.content_types == ["application/x-protobuf"]
    assert found.service_names() == {"pgnotify-worker"}


async def test_the_service_name_and_a_traces_endpoint_are_honoured(
    receiver: tuple[Receiver, str],
) -> None:
    found, url = receiver
    printed = await run_script(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{url}/v1/traces", OTEL_SERVICE_NAME="notify-eu"
    )
    assert printed == "otlp"
    assert found.service_names() == {"notify-eu"}


async def test_nothing_is_configured_without_otel_settings(receiver: tuple[Receiver, str]) -> None:
    found, url = receiver
    assert await run_script() == "None"
    assert await run_script(OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_SDK_DISABLED="true") == "None"
    assert await run_script(OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_TRACES_EXPORTER="none") == "None"
    assert found.requests == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
    ],
)
def test_which_exporters_otel_asks_for(env: dict[str, str], expected: list[str]) -> None:
    assert _exporters(env) == expected
