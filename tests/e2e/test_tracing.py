"""OpenTelemetry through the real stack: Caddy, auth and proxy under Granian, exporting over
OTLP/HTTP to a receiver started here, with only ``OTEL_EXPORTER_OTLP_ENDPOINT`` set.

One request is one trace: auth's span continues the client's ``traceparent``,
the proxy's span is its child (the context travels in the signed identity),
and the proxy's context goes on to Ollama. No key and no prompt text is in
anything exported.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SECRET
from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, require_caddy, sim_clear, sim_requests, start_stack
from tests.support.otlp import OtlpReceiver, running_otlp_receiver

pytestmark = pytest.mark.e2e

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
ERROR_STATUS = 2  # Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with running_otlp_receiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def traced_stack(
    database_url: str,
    redis_test_url: str,
    redis_prefix: str,
    caddy_version: str,
    receiver: OtlpReceiver,
) -> Iterator[E2EStack]:
    caddy = require_caddy(caddy_version)
    state = Path(tempfile.mkdtemp(prefix="nz-e2e-otel-"))
    env = {
        "PATH": os.environ["PATH"],
        "NZ_DATABASE_URL": database_url,
        "NZ_REDIS_URL": redis_test_url,
        "NZ_REDIS_PREFIX": f"{redis_prefix}otel",
        "NZ_GATEWAY_SECRET": TEST_SECRET,
        "NZ_AUDIT_SPOOL_DIR": str(state / "spool"),
        "NZ_AUDIT_FLUSH_INTERVAL_SECONDS": "0.1",
        "NZ_LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    stack = start_stack(env=env, log_dir=state, caddy=caddy, instances=1)
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


async def test_one_trace_from_the_client_through_auth_and_proxy_to_ollama(
    traced_stack: E2EStack, receiver: OtlpReceiver, ledger: Ledger, nonce: str
) -> None:
    caller = await ledger.issue()
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    prompt = f"the secret word is {nonce}-prompt"
    sim_clear(traced_stack)
    async with httpx.AsyncClient(base_url=traced_stack.url, timeout=20) as client:
        reply = await client.post(
            "/api/chat",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": prompt}]},
            headers={
                "Authorization": f"Bearer {caller.key}",
                "traceparent": f"00-{client_trace}-{client_span}-01",
            },
        )
    assert reply.status_code == 200
    request_id = reply.headers["x-request-id"]
    ours = {"neuronetz.request_id": request_id}
    (auth,) = receiver.wait_for(1, {**ours, "neuronetz.decision.outcome": "allowed"})
    (proxy,) = receiver.wait_for(1, {**ours, "neuronetz.surface": "native"})

    assert (auth.service, auth.name, auth.kind) == (
        "neuronetz-gateway-auth",
        "authorize",
        SERVER_KIND,
    )
    assert (auth.trace_id, auth.parent_span_id) == (client_trace, client_span)
    assert auth.attributes["neuronetz.route"] == "chat"
    assert auth.attributes["neuronetz.tenant"] == caller.tenant
    assert auth.attributes["http.response.status_code"] == 200

    assert proxy.service == "neuronetz-gateway-proxy"
    assert (proxy.trace_id, proxy.parent_span_id) == (client_trace, auth.span_id)
    assert proxy.name == "chat llama3.2:latest"
    attributes = proxy.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "llama3.2:latest"
    assert attributes["gen_ai.provider.name"] == "ollama"
    totals = await ledger.wait_for_requests(caller.tenant, 1)
    assert attributes["gen_ai.usage.input_tokens"] == totals.prompt_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == totals.completion_tokens > 0
    sim_port = int(traced_stack.simulator_url.rsplit(":", 1)[1])
    assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", sim_port)
    assert attributes["http.response.status_code"] == 200

    # Ollama got the proxy's context, so whatever fronts it joins the same trace
    (forwarded,) = [r for r in sim_requests(traced_stack) if r["path"] == "/api/chat"]
    headers = forwarded["headers"]
    assert isinstance(headers, dict)
    assert headers["traceparent"] == f"00-{client_trace}-{proxy.span_id}-01"

    # no key, no prompt: not in any attribute, name or resource of anything exported
    exported = b"".join(receiver.bodies)
    assert nonce.encode() not in exported
    assert caller.key.encode() not in exported
    assert caller.key[11:].encode() not in exported  # not even the secret part


async def test_without_a_client_context_auth_starts_the_trace(
    traced_stack: E2EStack, receiver: OtlpReceiver, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    async with httpx.AsyncClient(base_url=traced_stack.url, timeout=20) as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {caller.key}", "traceparent": "garbage"},
        )
        refused = await client.get("/api/tags", headers={"Authorization": "Bearer nz_wrong"})
    assert reply.status_code == 200
    assert refused.status_code == 401
    request_id = reply.headers["x-request-id"]
    ours = {"neuronetz.request_id": request_id}
    (auth,) = receiver.wait_for(1, {**ours, "neuronetz.decision.outcome": "allowed"})
    (proxy,) = receiver.wait_for(1, {**ours, "neuronetz.surface": "openai"})
    assert auth.parent_span_id == ""  # an unreadable traceparent is ignored
    assert (proxy.trace_id, proxy.parent_span_id) == (auth.trace_id, auth.span_id)
    assert proxy.attributes["neuronetz.streamed"] is True
    assert proxy.attributes["gen_ai.usage.output_tokens"] > 0
    # a refusal is traced too, without the key it presented
    refusals = receiver.wait_for(1, {"neuronetz.decision.reason": "malformed"})
    assert refusals[-1].attributes["http.response.status_code"] == 401
    assert refusals[-1].status_code != ERROR_STATUS  # a 401 is the client's, not ours
