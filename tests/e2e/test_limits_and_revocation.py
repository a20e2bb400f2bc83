"""Through real Caddy in front of two auth and two proxy instances: limits and revocation.

Caddy spreads requests over both instances of each service (random load
balancing), so exact limits and fast revocation here mean the state is
shared (Redis, Postgres notifications), not held per process.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_configure

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
OPENAI_CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


async def test_429_with_retry_after_reaches_the_client(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue(rpm=2)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for _ in range(2):
            assert (await client.post("/api/chat", json=CHAT, headers=auth)).status_code == 200
        native = await client.post("/api/chat", json=CHAT, headers=auth)
        openai_style = await client.post("/v1/chat/completions", json=OPENAI_CHAT, headers=auth)
    for refused in (native, openai_style):
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert refused.headers["content-type"].startswith("application/json")
    assert isinstance(native.json()["error"], str)
    assert openai_style.json()["error"]["code"] == "rate_limit_exceeded"


async def test_rpm_is_exact_across_two_auth_instances(e2e_stack: E2EStack, ledger: Ledger) -> None:
    limit, attempts = 10, 18
    caller = await ledger.issue(rpm=limit)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        answers = await asyncio.gather(
            *(client.post("/api/chat", json=CHAT, headers=auth) for _ in range(attempts))
        )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * limit + [429] * (attempts - limit)
    totals = await ledger.wait_for_requests(caller.tenant, limit)
    assert totals.requests == limit


async def test_concurrency_limit_holds_across_two_proxies(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(concurrency=2)
    auth = {"Authorization": f"Bearer {caller.key}"}
    sim_configure(e2e_stack, chunk_delay_ms=100.0)
    try:
        async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post("/api/chat", json=CHAT, headers=auth) for _ in range(5))
            )
    finally:
        sim_configure(e2e_stack, chunk_delay_ms=0.0)
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 429, 429, 429]


async def test_revocation_is_seen_by_every_auth_instance_within_a_second(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        # Warm the key caches of both auth instances (random balancing: 12 tries).
        for _ in range(12):
            assert (await client.get("/api/tags", headers=auth)).status_code == 200
        await ledger.store.revoke_key(caller.prefix)
        revoked_at = time.monotonic()
        while (await client.get("/api/tags", headers=auth)).status_code != 401:
            assert time.monotonic() - revoked_at < 1.0, "still accepted a second after revocation"
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - revoked_at)))
        later = await asyncio.gather(*(client.get("/api/tags", headers=auth) for _ in range(12)))
    assert {r.status_code for r in later} == {401}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_revoking_a_key_ends_its_running_stream_through_caddy(
    e2e_stack: E2EStack, ledger: Ledger, path: str
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}"}
    body = {**OPENAI_CHAT, "stream": True}
    sim_configure(e2e_stack, chunks=200, chunk_delay_ms=50.0)  # ten seconds of answer
    lines: list[str] = []
    try:
        async with (
            httpx.AsyncClient(base_url=e2e_stack.url, timeout=30) as client,
            client.stream("POST", path, json=body, headers=auth) as reply,
        ):
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:
                    await ledger.store.revoke_key(caller.prefix)
                    revoked_at = time.monotonic()
            ended_after = time.monotonic() - revoked_at
    finally:
        sim_configure(e2e_stack, chunks=20, chunk_delay_ms=0.0)
    assert ended_after < 1.0, f"the stream ran on {ended_after:.2f}s after revoke"
    assert "the API key was revoked" in lines[-1]
    assert len(lines) < 100
    await ledger.wait_for_requests(caller.tenant, 1)
    (row,) = await ledger.audit(caller.tenant)
    assert row["revoked"] is True
    assert row["completion_tokens"] >= 2
