"""Optional OpenTelemetry tracing: a span per claim batch and per send, continuing the producer's
trace from the row's traceparent. The spans use the OpenTelemetry API (the `tracing` extra). Where
they go: when the SDK and the OTLP/HTTP exporter are installed (the `otlp` extra; the image has
them) and OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT or OTEL_TRACES_EXPORTER asks for it, the worker sets
up the SDK from the standard OTEL_* variables itself (configure_sdk); a provider set up already
(`opentelemetry-instrument pgnotify-worker run`, tests) is kept. Without the API installed, or
with PGNOTIFY_TRACING=false, every call here is a no-op. The API itself is imported only when
something can use it (an OTEL_* variable is set, or a tracer provider's code imported it): a
worker that traces nothing does not keep it resident."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from types import ModuleType
from typing import Any

from pgnotify_worker import __version__
from pgnotify_worker.models import Notification

log = logging.getLogger("pgnotify_worker.tracing")
_configured: str | None = None
API = "opentelemetry.trace"


def installed() -> bool:
    """Is the OpenTelemetry API installed (the tracing extra)? Found without importing it."""
    if API in sys.modules:
        return True
    try:
        return importlib.util.find_spec(API) is not None
    except (ImportError, ValueError):
        return False


def _trace() -> ModuleType:
    from opentelemetry import trace  # noqa: PLC0415 - see the module docstring

    return trace


def _propagate() -> ModuleType:
    from opentelemetry import propagate  # noqa: PLC0415

    return propagate


def _exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters OTEL_* asks for: [] when none (nothing to configure)."""
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names:
        return [] if names == ["none"] else [n for n in names if n != "none"]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def configure_sdk(env: Mapping[str, str] | None = None) -> str | None:
    """Set up the OpenTelemetry SDK from OTEL_* (once per process): a TracerProvider with the
    resource of OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES (service.name pgnotify-worker by
    default) and a batch processor per exporter of OTEL_TRACES_EXPORTER (otlp when only an
    endpoint is set; otlp is OTLP/HTTP, configured by the exporter from OTEL_EXPORTER_OTLP_*;
    console). Returns what it set up, or None: nothing asked for, OTEL_SDK_DISABLED, no SDK
    installed, or a provider already set by someone else."""
    global _configured  # noqa: PLW0603 - the SDK's provider is process-wide too
    env = os.environ if env is None else env
    if _configured is not None:
        return _configured
    names = _exporters(env)
    if not names or env.get("OTEL_SDK_DISABLED", "").lower() == "true" or not installed():
        return None
    trace = _trace()
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None  # opentelemetry-instrument or the embedding application configured one
    try:  # the SDK is imported only when export is asked for (start-up time, optional extra)
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
        )
    except ImportError:
        log.warning("OTEL_* asks for span export but opentelemetry-sdk is not installed")
        return None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "pgnotify-worker"}
    provider = TracerProvider(resource=Resource.create(attributes))
    done = []
    for name in names:
        exporter: Any
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %s is not supported here: use http/protobuf", protocol)
                continue
            try:
                from opentelemetry.exporter.otlp.proto.http import trace_exporter  # noqa: PLC0415
            except ImportError:
                log.warning(
                    "OTLP export asked for but opentelemetry-exporter-otlp-proto-http is "
                    "not installed (the otlp extra)"
                )
                continue
            # endpoint, headers, timeout, compression: the exporter reads OTEL_EXPORTER_OTLP_*
            exporter = trace_exporter.OTLPSpanExporter()
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console)", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
        done.append(name)
    if not done:
        return None
    trace.set_tracer_provider(provider)  # flushed at exit (the SDK's atexit shutdown)
    _configured = ",".join(done)
    log.info("tracing: spans exported with %s", _configured)
    return _configured


_live = False


def live() -> bool:
    """Has a real tracer provider been set (the SDK, opentelemetry-instrument, a test)? Until
    then every span is a no-op that still cost ~4 % of a drain's CPU to open and close; once set,
    a provider stays set. Setting one imports the API, so until then nothing is imported here."""
    global _live  # noqa: PLW0603 - the provider is process-wide
    if not _live:
        trace = sys.modules.get(API)
        if trace is not None:
            _live = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _live


class Tracing:
    """The worker's spans; a no-op when disabled or when OpenTelemetry is absent."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and installed()
        self._tracer: Any = None
        if self.enabled:
            configure_sdk()
            if any(name.startswith("OTEL_") for name in os.environ):
                # OTEL_PYTHON_TRACER_PROVIDER and friends take effect when the API is first
                # asked for a tracer: ask now, as the worker always did at start
                self.tracer()

    def tracer(self) -> Any:
        """The API's tracer for the worker (imports the API)."""
        if self._tracer is None:
            self._tracer = _trace().get_tracer("pgnotify-worker", __version__)
        return self._tracer

    @property
    def active(self) -> bool:
        """Spans would be recorded: enabled and a provider is set."""
        return self.enabled and live()

    @contextlib.contextmanager
    def claim(self, channel: str) -> Iterator[Any]:
        """Around one claim statement; the caller may set `rows` on the yielded span."""
        if not self.active:
            yield None
            return
        with self.tracer().start_as_current_span(
            "pgnotify.claim",
            kind=_trace().SpanKind.CONSUMER,
            attributes={"pgnotify.channel": channel},
        ) as span:
            yield span

    @contextlib.contextmanager
    def send(self, n: Notification) -> Iterator[Any]:
        """Around one delivery; its parent is the producer's span when the row carries one."""
        if not self.active:
            yield None
            return
        parent = _propagate().extract({"traceparent": n.traceparent}) if n.traceparent else None
        with self.tracer().start_as_current_span(
            "pgnotify.send",
            context=parent,
            kind=_trace().SpanKind.PRODUCER,
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
    if live():
        _propagate().inject(headers)
