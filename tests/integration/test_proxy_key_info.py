"""The proxy renders the key-info routes from the signed state alone: nothing reaches
Ollama or Redis, and an identity for another route or without a state is refused."""

from __future__ import annotations

import time

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.key_state import KeyState, LevelState, WindowState
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

pytest_plugins = ["tests.support.proxy_fixtures"]


def _state() -> KeyState:
    now = int(time.time() * 1000)
    return KeyState(
        read_at_ms=now,
        key=LevelState(requests=WindowState(3, now + 20_000), daily_tokens=250),
        tenant=LevelState(total_tokens=9_000),
    )


@pytest.mark.parametrize(("path", "route"), [("/v1/key", "v1.key"), ("/api/key", "key")])
async def test_key_info_is_rendered_from_the_identity(
    proxy: ProxyServer, sim: SimulatorServer, store: Store, path: str, route: str
) -> None:
    ids = new_ids()
    token = signed(
        route,
        request_id=f"req-key-{ids['key_id']}",
        key_prefix="nz_keyinfo1",
        tenant_name="acme-key-info",
        models=["llama3.2:latest"],
        key_limits=Limits(rpm=10, daily_tokens=1000),
        tenant_limits=Limits(total_tokens=10_000),
        allowance=Allowance(limit_requests=10, remaining_requests=7),
        key_state=_state(),
        **ids,
    )
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{proxy.url}{path}?ignored=1", headers={IDENTITY_HEADER: token})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-request-id"] == f"req-key-{ids['key_id']}"
    assert reply.headers["x-ratelimit-remaining-requests"] == "7"
    body = reply.json()
    assert (body["prefix"], body["tenant"], body["models"]) == (
        "nz_keyinfo1",
        "acme-key-info",
        ["llama3.2:latest"],
    )
    limits = body["limits"]
    assert (limits["requests_per_minute"]["remaining"], limits["requests_per_minute"]["level"]) == (
        7,
        "key",
    )
    assert 19 <= limits["requests_per_minute"]["resets_in_seconds"] <= 20
    assert limits["daily_tokens"]["remaining"] == 750
    assert limits["total_tokens"]["remaining"] == 1_000
    assert limits["total_tokens"]["level"] == "tenant"
    assert limits["tokens_per_minute"]["limit"] is None
    assert sim.requests() == []  # not even model discovery
    rows = await wait_audit_rows(store, [f"req-key-{ids['key_id']}"])
    row = rows[f"req-key-{ids['key_id']}"]
    assert (row["route"], row["status"], row["prompt_tokens"]) == (route, 200, 0)


def test_an_identity_for_another_route_or_without_state_is_refused(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    for_tags = signed("tags", key_state=_state())
    native = httpx.get(f"{proxy.url}/api/key", headers={IDENTITY_HEADER: for_tags})
    assert native.status_code == 401
    assert native.json() == {"error": "invalid or missing gateway identity"}
    stateless = httpx.get(f"{proxy.url}/v1/key", headers={IDENTITY_HEADER: signed("v1.key")})
    assert stateless.status_code == 503
    assert stateless.json()["error"]["code"] == "service_unavailable"
    assert stateless.headers["retry-after"] == "1"
    unsigned = httpx.get(f"{proxy.url}/v1/key")
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "invalid_api_key"
    wrong_method = httpx.post(f"{proxy.url}/v1/key", headers={IDENTITY_HEADER: signed("v1.key")})
    assert wrong_method.status_code == 405
    assert sim.requests() == []
