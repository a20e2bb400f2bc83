"""Reservation and settlement: concurrent requests cannot overspend a budget."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.accounting import estimate_prompt_tokens
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.simulator import PROMPT_OVERHEAD
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

PROMPT = "hello"
NUM_PREDICT = 10

pytest_plugins = ["tests.support.proxy_fixtures"]


async def test_thirty_concurrent_requests_against_a_budget_for_ten(
    proxy: ProxyServer, sim: SimulatorServer, store: Store, redis_test_url: str, redis_prefix: str
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
    # every settle named its reservation: each record is now only the "settled" mark
    # (kept so a repeated settle charges nothing twice), none is left for the sweep to
    # give back
    redis = aioredis.from_url(redis_test_url)
    try:
        records = await redis.hvals(f"{redis_prefix}:{{t{ids['tenant_id']}}}:resv:rec")
        assert len(records) == len(ok)
        assert set(records) == {b"settled"}
    finally:
        await redis.aclose()


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


async def test_a_small_budget_is_usable_without_max_tokens(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    """No client cap: the output is sized to the room left and forwarded as num_predict."""
    sim.configure(chunk_delay_ms=0)
    sim.clear()
    ids = new_ids()
    budget = 200
    limits = Limits(daily_tokens=budget, tpm=1000)
    served = spent = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(20):
            # what the auth service would have signed: the room Redis had left
            allowance = Allowance(
                remaining_daily_tokens=budget - spent, remaining_tokens=1000 - spent
            )
            token = signed(
                "chat",
                request_id=f"req-small-{ids['key_id']}-{n}",
                key_limits=limits,
                allowance=allowance,
                **ids,
            )
            reply = await client.post(
                f"{proxy.url}/api/chat",
                json={
                    "model": "llama3.2",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": False,
                },
                headers={IDENTITY_HEADER: token},
            )
            if reply.status_code == 429:
                break
            assert reply.status_code == 200, reply.text
            spent += reply.json()["prompt_eval_count"] + reply.json()["eval_count"]
            served += 1
    assert served >= 2  # a 2048-token default reservation would have refused the first one
    # (not the discovery GET /api/tags, recorded when the model list was due a refresh)
    forwarded = [r["body"]["options"]["num_predict"] for r in sim.requests() if r["body"]]
    assert all(0 < n <= budget for n in forwarded)
    rows = await wait_audit_rows(store, [f"req-small-{ids['key_id']}-{n}" for n in range(served)])
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows.values()) <= budget


async def test_deeply_nested_json_is_a_400_in_both_dialects(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.clear()
    deep = b'{"model":"llama3.2","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ids = new_ids()
    async with httpx.AsyncClient(timeout=30) as client:
        for route, path in (("chat", "/api/chat"), ("v1.chat.completions", "/v1/chat/completions")):
            reply = await client.post(
                f"{proxy.url}{path}",
                content=deep,
                headers={IDENTITY_HEADER: signed(route, **ids), "content-type": "application/json"},
            )
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert (
                ("not valid JSON" in error)
                if path.startswith("/api")
                else (error["type"] == "invalid_request_error")
            )
    assert sim.requests() == []
