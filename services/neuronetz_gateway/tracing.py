"""OpenTelemetry traces, off unless ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set.

Off means off: :func:`tracing_from_env` returns ``None``, the services keep
``None`` and skip every tracing step with one ``is None`` test, and nothing
of OpenTelemetry is imported by this module.

On, each service exports its spans over OTLP/HTTP (protobuf) from a batch
processor thread, configured by the standard ``OTEL_*`` variables
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_HEADERS``...). One request is one trace: auth's
``authorize`` span continues a client's W3C ``traceparent`` (if it sent a
valid one) and its own context travels to the proxy inside the signed
identity (Caddy copies only that header); the proxy's span is its child and
its ``traceparent`` goes on to Ollama. Spans carry ids, routes, models,
counts and outcomes: never a key, a header value or prompt text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only imported when tracing is on
    from opentelemetry.sdk.trace import Span, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TRACEPARENT_HEADER",
    "Tracing",
    "TracingConfigError",
    "check_tracing_env",
    "parse_traceparent",
    "tracing_enabled",
    "tracing_from_env",
]

TRACEPARENT_HEADER = "traceparent"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_SUPPORTED_PROTOCOL = "http/protobuf"
# W3C trace-context version 00: trace id and span id not all zeros (checked below)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TracingConfigError(ValueError):
    """An ``OTEL_*`` variable asks for something this gateway does not do."""


def tracing_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether an OTLP endpoint is configured (and the SDK not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINTS)


def check_tracing_env(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, naming the variable, an OTLP protocol other than HTTP/protobuf."""
    if not tracing_enabled(environ):
        return
    for name in _PROTOCOLS:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != _SUPPORTED_PROTOCOL:
            raise TracingConfigError(
                f"{name}={protocol!r}: only {_SUPPORTED_PROTOCOL!r} (OTLP over HTTP) is supported"
            )


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a valid W3C ``traceparent``, else ``None``."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(match[3], 16)


class Tracing:
    """One service's tracer: start server spans, say their ``traceparent``, end them."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind

        self._provider = provider
        self._tracer = provider.get_tracer("neuronetz_gateway")
        self._server = SpanKind.SERVER

    @classmethod
    def with_exporter(cls, service: str, exporter: SpanExporter, *, batch: bool = True) -> Tracing:
        """Spans of ``service`` to ``exporter`` (tests pass the SDK's in-memory one, unbatched)."""
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
        provider = TracerProvider(resource=Resource.create(attributes))
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        return cls(provider)

    def start(
        self, name: str, parent: str | None, attributes: Mapping[str, Any] | None = None
    ) -> Span:
        """A server span, child of the ``traceparent`` ``parent`` when that is valid."""
        from opentelemetry import trace

        context = None
        parsed = parse_traceparent(parent)
        if parsed is not None:
            trace_id, span_id, flags = parsed
            remote = trace.SpanContext(
                trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 1)
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        span: Span = self._tracer.start_span(  # type: ignore[assignment]
            name, context=context, kind=self._server, attributes=attributes
        )
        return span

    @staticmethod
    def traceparent(span: Span) -> str:
        """The W3C ``traceparent`` that makes the next hop a child of ``span``."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    @staticmethod
    def finish(span: Span, attributes: Mapping[str, Any], *, status_code: int) -> None:
        """Set the outcome and end ``span``; 5xx answers mark it as an error."""
        from opentelemetry.trace import Status, StatusCode

        span.set_attributes(attributes)
        span.set_attribute("http.response.status_code", status_code)
        if status_code >= 500:
            span.set_attribute("error.type", str(status_code))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter thread."""
        self._provider.shutdown()


def tracing_from_env(service: str, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """The tracer for ``service`` (``auth`` / ``proxy``) when tracing is configured, else None."""
    if not tracing_enabled(environ):
        return None
    check_tracing_env(environ)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # the exporter reads the endpoint (appending /v1/traces to the base one), headers,
    # timeout and compression from the same OTEL_* variables
    return Tracing.with_exporter(f"neuronetz-gateway-{service}", OTLPSpanExporter())
