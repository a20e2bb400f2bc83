"""Reservation and settlement: concurrent requests cannot overspend a budget."""

from __future__ import annotations

import asyncio

import httpx

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.accounting import estimate_prompt_tokens
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.simulator import PROMPT_OVERHEAD
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

PROMPT = "hello"
NUM_PREDICT = 10

pytest_plugins = ["tests.support.proxy_fixtures"]


async def test_thirty_concurrent_requests_against_a_budget_for_ten(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    sim.configure(chunk_delay_ms=20)
    reservation = estimate_prompt_tokens([PROMPT]) + NUM_PREDICT
    actual = (1 + PROMPT_OVERHEAD) + NUM_PREDICT  # what the simulator will count
    assert actual <= reservation  # so the stated bound (sum of actual - reserved > 0) is 0
    budget = 10 * reservation
    ids = new_ids()
    key_limits = Limits(daily_tokens=budget)

    async def one(client: httpx.AsyncClient, n: int) -> httpx.Response:
        token = signed(
            "generate",
            request_id=f"req-bud-{ids['key_id']}-{n}",
            key_limits=key_limits,
            **ids,
        )
        return await client.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": PROMPT, "options": {"num_predict": NUM_PREDICT}},
            headers={IDENTITY_HEADER: token},
        )

    async with httpx.AsyncClient(timeout=30) as client:
        replies = await asyncio.gather(*(one(client, n) for n in range(30)))
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(refused) == 30
    assert len(ok) >= 10  # everything that fits in the budget was served
    for reply in refused:
        assert reply.json()["error"].startswith("token budget exceeded")
        assert int(reply.headers["retry-after"]) >= 1
    for reply in ok:
        assert int(reply.headers["x-ratelimit-remaining-daily-tokens"]) >= 0

    rows = await wait_audit_rows(store, [f"req-bud-{ids['key_id']}-{n}" for n in range(30)])
    charged = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows.values())
    assert charged <= budget  # + the bound, which is 0 here (no estimate undershoots)
    assert charged == len(ok) * actual
    assert sorted(r["status"] for r in rows.values()) == sorted(r.status_code for r in replies)


async def test_streaming_success_carries_ratelimit_headers(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    ids = new_ids()
    limits = Limits(tpm=100_000, daily_tokens=50_000)
    token = signed("chat", key_limits=limits, tenant_limits=limits, **ids)
    async with (
        httpx.AsyncClient() as client,
        client.stream(
            "POST",
            f"{proxy.url}/api/chat",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
            headers={IDENTITY_HEADER: token},
        ) as reply,
    ):
        headers = reply.headers
        await reply.aread()
    assert headers["x-request-id"]
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    remaining = int(headers["x-ratelimit-remaining-tokens"])
    assert 100_000 - 2048 - 10 <= remaining < 100_000  # this request's reservation is counted
    assert int(headers["x-ratelimit-remaining-daily-tokens"]) < 50_000
