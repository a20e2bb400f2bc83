"""A signed identity serves one request: a replay straight to the proxy is a 401 and a metric.

It is refused whatever the first use became (200, a refusal, a client that
left), whether the proxy reserves tokens (the claim rides in that script) or
not (one SET NX), on concurrent replays, and it does no accounting: no
second audit row under the request id, no release of the first request's
concurrency lease, no second reservation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import Limits
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}
UNAUTHORISED = {"error": "invalid or missing gateway identity"}

pytest_plugins = ["tests.support.proxy_fixtures"]


@pytest.fixture
async def limiter(redis_test_url: str, redis_prefix: str, store: Store) -> AsyncIterator[Limiter]:
    redis = await open_redis(redis_test_url)
    limiter = Limiter(redis, prefix=redis_prefix, ledger=store)
    yield limiter
    await limiter.aclose()
    await redis.aclose()


def _replays(proxy: ProxyServer) -> float:
    text = httpx.get(f"{proxy.url}/metrics").text
    found = re.search(r"^nz_proxy_identity_replays_total (\S+)$", text, re.M)
    assert found, "nz_proxy_identity_replays_total is not exported"
    return float(found.group(1))


async def _audit_rows(store: Store, request_id: str) -> list[dict[str, object]]:
    await asyncio.sleep(0.6)  # two flush intervals: a replay's row would be written by now
    rows = await store.pool.fetch("SELECT * FROM usage_log WHERE request_id = $1", request_id)
    return [dict(r) for r in rows]


@pytest.mark.parametrize(
    "limits",
    [Limits(), Limits(total_tokens=100_000)],
    ids=["no-token-limits", "reserving"],
)
async def test_a_replayed_identity_is_401_and_never_reaches_ollama(
    proxy: ProxyServer, sim: SimulatorServer, store: Store, limits: Limits
) -> None:
    ids = new_ids()
    request_id = f"req-replay-{ids['key_id']}"
    token = signed("chat", request_id=request_id, key_limits=limits, **ids)
    before = _replays(proxy)
    async with httpx.AsyncClient(timeout=10) as client:
        first, second = [
            await client.post(
                f"{proxy.url}/api/chat",
                json={**CHAT, "stream": False},
                headers={IDENTITY_HEADER: token},
            )
            for _ in range(2)
        ]
    assert first.status_code == 200, first.text
    assert second.status_code == 401
    assert second.json() == UNAUTHORISED
    assert _replays(proxy) == before + 1
    # (a /metrics scrape probes the backend's /api/version: only chats count here)
    assert len([f for f in sim.forwarded() if f["path"] == "/api/chat"]) == 1
    rows = await _audit_rows(store, request_id)
    assert [r["status"] for r in rows] == [200]


def test_a_replay_on_the_openai_surface_is_its_401(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    token = signed("v1.chat.completions")
    url = f"{proxy.url}/v1/chat/completions"
    assert httpx.post(url, json=CHAT, headers={IDENTITY_HEADER: token}).status_code == 200
    replay = httpx.post(url, json=CHAT, headers={IDENTITY_HEADER: token})
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "invalid_api_key"
    assert len(sim.forwarded()) == 1


@pytest.mark.parametrize("path", ["/api/tags", "/api/version", "/v1/models"])
def test_routes_without_a_body_are_single_use_too(
    proxy: ProxyServer, sim: SimulatorServer, path: str
) -> None:
    token = signed("v1.models" if path == "/v1/models" else path.rsplit("/", 1)[1])
    assert httpx.get(f"{proxy.url}{path}", headers={IDENTITY_HEADER: token}).status_code == 200
    assert httpx.get(f"{proxy.url}{path}", headers={IDENTITY_HEADER: token}).status_code == 401


async def test_concurrent_replays_get_exactly_one_answer(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    ids = new_ids()
    request_id = f"req-burst-{ids['key_id']}"
    token = signed("chat", request_id=request_id, **ids)
    async with httpx.AsyncClient(timeout=10) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    f"{proxy.url}/api/chat",
                    json={**CHAT, "stream": False},
                    headers={IDENTITY_HEADER: token},
                )
                for _ in range(20)
            )
        )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] + [401] * 19
    assert len(sim.forwarded()) == 1
    rows = await _audit_rows(store, request_id)
    assert [r["status"] for r in rows] == [200]


async def test_an_identity_used_up_by_a_refusal_cannot_be_replayed(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    ids = new_ids()
    request_id = f"req-refused-{ids['key_id']}"
    token = signed("chat", request_id=request_id, **ids)
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(
            f"{proxy.url}/api/chat",
            content=b"{not json",
            headers={IDENTITY_HEADER: token, "content-type": "application/json"},
        )
        replay = await client.post(
            f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
        )
    assert refused.status_code == 400
    assert replay.status_code == 401
    assert sim.forwarded() == []
    rows = await _audit_rows(store, request_id)
    assert [r["status"] for r in rows] == [400]


async def test_a_replay_during_the_stream_leaves_its_lease_and_budget_alone(
    proxy: ProxyServer, sim: SimulatorServer, store: Store, limiter: Limiter, redis_prefix: str
) -> None:
    sim.configure(chunks=20, chunk_delay_ms=50)
    ids = new_ids()
    limits = Limits(concurrency=1, total_tokens=100_000)
    admitted = await limiter.admit(
        key_limits=limits, tenant_limits=Limits(), request_id="admit", **ids
    )
    assert admitted.lease_id is not None
    conc_key = f"{redis_prefix}:{{t{ids['tenant_id']}}}:conc:k{ids['key_id']}"
    total_key = f"{redis_prefix}:{{t{ids['tenant_id']}}}:bud:k{ids['key_id']}:total"
    request_id = f"req-lease-{ids['key_id']}"
    token = signed(
        "chat", request_id=request_id, lease_id=admitted.lease_id, key_limits=limits, **ids
    )
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream(
            "POST", f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
        ) as stream,
    ):
        lines = stream.aiter_lines()
        assert await anext(lines)  # the stream runs and holds the lease
        reserved = int(await limiter._redis.get(total_key))
        replay = await client.post(
            f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
        )
        assert replay.status_code == 401
        assert await limiter._redis.zcard(conc_key) == 1  # still the stream's
        assert int(await limiter._redis.get(total_key)) == reserved  # nothing reserved again
        async for _ in lines:
            pass
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["status"] == 200
    assert await limiter._redis.zcard(conc_key) == 0  # released once, by the stream
