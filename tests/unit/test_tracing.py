"""Tracing with the SDK's in-memory exporter: off unless configured, W3C parents, outcomes,
and the proxy's GenAI attributes (no key, no prompt)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from neuronetz_gateway.domain.accounting import AuditRow
from neuronetz_gateway.proxy.spans import backend_address, span_attributes, span_name
from neuronetz_gateway.tracing import (
    Tracing,
    TracingConfigError,
    check_tracing_env,
    parse_traceparent,
    tracing_enabled,
    tracing_from_env,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.with_exporter("neuronetz-gateway-test", exporter, batch=False), exporter


def test_off_unless_an_endpoint_is_set() -> None:
    assert not tracing_enabled({})
    assert not tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing_enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing_from_env("auth", {}) is None


def test_only_otlp_over_http_is_accepted() -> None:
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    check_tracing_env({**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    check_tracing_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})  # off: not looked at
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        check_tracing_env({**on, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})


def test_off_the_services_do_not_load_the_tracing_sdk() -> None:
    code = (
        "import sys, neuronetz_gateway.auth.app, neuronetz_gateway.proxy.app, "
        "neuronetz_gateway.cli.main; "
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.exporter'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_traceparent_parsing_follows_w3c() -> None:
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-01") == (int(TRACE, 16), int(PARENT, 16), 1)
    for bad in (
        None,
        "",
        "garbage",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE.upper()}-{PARENT}-01",  # lower-case hex only
        f"00-{TRACE}-{PARENT}-01-extra",
    ):
        assert parse_traceparent(bad) is None, bad


def test_a_span_continues_a_valid_parent_and_says_its_own_context() -> None:
    tracing, exporter = _tracing()
    span = tracing.start("authorize", f"00-{TRACE}-{PARENT}-01", {"neuronetz.route": "chat"})
    context = tracing.traceparent(span)
    Tracing.finish(span, {"neuronetz.decision.outcome": "allowed"}, status_code=200)
    (done,) = exporter.get_finished_spans()
    assert done.kind is SpanKind.SERVER
    assert done.parent is not None
    assert (done.context.trace_id, done.parent.span_id) == (int(TRACE, 16), int(PARENT, 16))
    assert context == f"00-{TRACE}-{done.context.span_id:016x}-01"
    assert done.attributes is not None
    assert done.attributes["http.response.status_code"] == 200
    assert done.status.status_code is StatusCode.UNSET
    assert done.resource.attributes["service.name"] == "neuronetz-gateway-test"


def test_an_invalid_parent_starts_a_new_trace_and_5xx_is_an_error() -> None:
    tracing, exporter = _tracing()
    span = tracing.start("authorize", "00-nope")
    Tracing.finish(span, {}, status_code=503)
    (done,) = exporter.get_finished_spans()
    assert done.parent is None
    assert done.status.status_code is StatusCode.ERROR
    assert done.attributes is not None
    assert done.attributes["error.type"] == "503"


def _row(route: str, model: str | None) -> AuditRow:
    return AuditRow(
        request_id="req-1",
        ts=datetime(2026, 12, 2, tzinfo=UTC),
        tenant_id=3,
        key_id=7,
        key_prefix="nz_abc12345",
        route=route,
        model=model,
        status=200,
        prompt_tokens=12,
        completion_tokens=30,
        ttfb_ms=15,
        duration_ms=80,
        streamed=True,
        client_disconnected=False,
        estimated=False,
    )


def test_proxy_spans_carry_genai_attributes_and_no_key() -> None:
    attributes = span_attributes(
        _row("v1.chat.completions", "llama3.2:latest"),
        surface="openai",
        backend=backend_address("http://user:pw@gpu1.internal:11434"),
        tenant="acme",
    )
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "llama3.2:latest"
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert attributes["gen_ai.usage.output_tokens"] == 30
    assert attributes["neuronetz.surface"] == "openai"
    assert (attributes["server.address"], attributes["server.port"]) == ("gpu1.internal", 11434)
    text = repr(attributes)
    assert "nz_abc12345" not in text  # not even the key's public prefix
    assert "pw" not in text.replace("openai", "")  # nor the backend's credentials
    assert span_name("generate", "qwen2.5:0.5b") == "text_completion qwen2.5:0.5b"
    assert span_name("tags", None) == "proxy tags"
    assert span_name("v1.messages", "llama3.2:latest") == "chat llama3.2:latest"
    listing = span_attributes(
        _row("tags", None), surface="native", backend=("h", 80), tenant="acme"
    )
    assert "gen_ai.operation.name" not in listing
