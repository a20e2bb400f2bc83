"""Auth's span with the SDK's in-memory exporter: it continues the client's context, signs its
own into the identity for the proxy, and names neither the key nor its prefix."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.identity import IDENTITY_HEADER, verify_identity
from neuronetz_gateway.settings import Settings
from neuronetz_gateway.tracing import Tracing
from tests.conftest import TEST_SECRET
from tests.integration.auth_helpers import authorize, make_key, make_settings, running_app

pytestmark = pytest.mark.integration

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def settings(database_url: str, redis_test_url: str, redis_prefix: str) -> Settings:
    return make_settings(database_url, redis_test_url, redis_prefix)


async def test_the_identity_carries_auths_span_context(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter("neuronetz-gateway-auth", exporter, batch=False)
    async with running_app(settings, store, tracing=tracing) as (client, _):
        allowed = await authorize(
            client, made.full, extra={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        refused = await authorize(client, made.full[:-1] + "x", method="GET", uri="/v1/models")
    assert allowed.status_code == 200
    assert refused.status_code == 401
    identity = verify_identity(allowed.headers[IDENTITY_HEADER], TEST_SECRET.encode(), 0)
    first, second = exporter.get_finished_spans()
    assert first.parent is not None
    assert (first.context.trace_id, first.parent.span_id) == (
        int(CLIENT_TRACE, 16),
        int(CLIENT_SPAN, 16),
    )
    assert identity.traceparent == f"00-{CLIENT_TRACE}-{first.context.span_id:016x}-01"
    assert first.attributes is not None
    assert dict(first.attributes) == {
        "neuronetz.request_id": identity.request_id,
        "neuronetz.decision.outcome": "allowed",
        "neuronetz.decision.reason": "ok",
        "neuronetz.route": "chat",
        "neuronetz.tenant": made.record.tenant_name,
        "http.response.status_code": 200,
    }
    assert second.parent is None  # no client context: a new trace
    assert second.attributes is not None
    assert second.attributes["neuronetz.decision.reason"] == "malformed"
    assert second.attributes["http.response.status_code"] == 401
    for span in (first, second):
        assert made.record.prefix not in repr(dict(span.attributes or {}))


async def test_off_the_identity_has_no_trace_context(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    async with running_app(settings, store) as (client, _):
        allowed = await authorize(
            client, made.full, extra={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
    identity = verify_identity(allowed.headers[IDENTITY_HEADER], TEST_SECRET.encode(), 0)
    assert identity.traceparent is None
