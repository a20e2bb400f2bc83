"""Through the real stack: a signed identity captured once serves one request, on any replica.

The red-team probe: take the ``X-NZ-Identity`` that auth hands Caddy (here
by asking auth exactly as Caddy's forward_auth does) and send it straight
to the proxies again and again. Before single use, 20 of 20 went through
past ``rpm 3`` / ``concurrency 1`` and after ``revoke-key``, all under one
request id.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_requests

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _chats(stack: E2EStack) -> int:
    return sum(1 for r in sim_requests(stack) if r.get("path") == "/api/chat")


async def _captured_identity(stack: E2EStack, key: str) -> tuple[str, str]:
    """The identity and request id auth answers forward_auth with, as Caddy receives them."""
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.get(
            f"{stack.auth_urls[0]}/authorize",
            headers={
                "X-Forwarded-Method": "POST",
                "X-Forwarded-Uri": "/api/chat",
                "Authorization": f"Bearer {key}",
            },
        )
    assert reply.status_code == 200, reply.text
    return reply.headers["x-nz-identity"], reply.headers["x-request-id"]


async def test_a_captured_identity_serves_one_request_on_every_proxy(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(rpm=3, concurrency=1)
    token, request_id = await _captured_identity(e2e_stack, caller.key)
    before = _chats(e2e_stack)
    async with httpx.AsyncClient(timeout=10) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    f"{e2e_stack.proxy_urls[i % 2]}/api/chat",
                    json=CHAT,
                    headers={"x-nz-identity": token},
                )
                for i in range(20)
            )
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses == [200] + [401] * 19
        # once revoked, the identity is no more use than before: still 401
        await ledger.store.revoke_key(caller.prefix)
        late = await client.post(
            f"{e2e_stack.proxy_urls[0]}/api/chat", json=CHAT, headers={"x-nz-identity": token}
        )
        assert late.status_code == 401
        # and through Caddy, where a client's X-NZ-Identity is stripped, the key is refused
        edge = await client.post(
            f"{e2e_stack.url}/api/chat",
            json=CHAT,
            headers={"x-nz-identity": token, "Authorization": f"Bearer {caller.key}"},
        )
        assert edge.status_code == 401
    assert _chats(e2e_stack) - before == 1
    totals = await ledger.wait_for_requests(caller.tenant, 1)
    assert totals.requests == 1
    rows = [r for r in await ledger.audit(caller.tenant) if r["request_id"] == request_id]
    assert [r["status"] for r in rows] == [200]


async def test_requests_through_caddy_each_get_a_fresh_identity(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(rpm=3)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        replies = [await client.post("/api/chat", json=CHAT, headers=auth) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    ids = {r.headers["x-request-id"] for r in replies[:3]}
    assert len(ids) == 3
    await ledger.wait_for_requests(caller.tenant, 3)
    rows = await ledger.audit(caller.tenant)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
