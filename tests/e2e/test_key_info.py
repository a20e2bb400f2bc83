"""``GET /v1/key`` and ``GET /api/key`` through real Caddy, auth and proxy: every limit
kind reflects what the key really used, reading costs no RPM, and no other key's or
tenant's figures ever show."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from neuronetz_gateway.domain.policy import PolicySettings
from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
KEY_POLICY = PolicySettings(
    rpm=3, tpm=50_000, concurrency=2, daily_tokens=40_000, monthly_tokens=60_000,
    total_tokens=80_000,
)  # fmt: skip
TENANT_LIMITS: dict[str, Any] = {
    "rpm": 100,
    "tpm": 100_000,
    "concurrency": 10,
    "daily_tokens": 400_000,
    "monthly_tokens": 600_000,
    "total_tokens": 800_000,
}
TOKEN_LIMITS = ("tokens_per_minute", "daily_tokens", "monthly_tokens", "total_tokens")


async def _info(client: httpx.AsyncClient, key: str, path: str = "/v1/key") -> dict[str, Any]:
    reply = await client.get(path, headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"]
    body: dict[str, Any] = reply.json()
    return body


async def test_every_limit_kind_counts_the_keys_own_use(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(key_policy=KEY_POLICY, **TENANT_LIMITS)
    sibling = await ledger.issue(caller.tenant, key_policy=KEY_POLICY)
    stranger = await ledger.issue(key_policy=KEY_POLICY, **TENANT_LIMITS)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        for path in ("/v1/key", "/api/key") * 3:  # six reads against an RPM of 3
            fresh = await _info(client, caller.key, path)
            assert fresh["limits"]["requests_per_minute"]["key"]["used"] == 0
        for _ in range(2):
            assert (await client.post("/api/chat", json=CHAT, headers=auth)).status_code == 200
        # six key reads and two chats: every answered request has its audit row
        spent = (await ledger.wait_for_requests(caller.tenant, 8)).total_tokens
        assert spent > 0
        mine = await _info(client, caller.key)
        theirs = await _info(client, sibling.key, "/api/key")
        outsider = await _info(client, stranger.key)
        # the RPM still has its third request: the reads cost none
        assert (await client.post("/api/chat", json=CHAT, headers=auth)).status_code == 200

    assert (mine["prefix"], mine["tenant"]) == (caller.prefix, caller.tenant)
    assert mine["models"] is None
    limits = mine["limits"]
    rpm = limits["requests_per_minute"]
    assert (rpm["limit"], rpm["used"], rpm["remaining"], rpm["level"]) == (3, 2, 1, "key")
    assert rpm["tenant"]["used"] == 2
    assert 1 <= rpm["resets_in_seconds"] <= 60
    concurrency = limits["concurrency"]
    assert (concurrency["limit"], concurrency["used"], concurrency["resets_at"]) == (2, 0, None)
    for name in TOKEN_LIMITS:
        assert limits[name]["key"]["used"] == spent, name
        assert limits[name]["tenant"]["used"] == spent, name
        assert limits[name]["level"] == "key"
    assert limits["daily_tokens"]["remaining"] == 40_000 - spent
    assert limits["daily_tokens"]["resets_at"].endswith("T00:00:00.000Z")
    assert limits["total_tokens"]["resets_at"] is None

    # the sibling shares the tenant's figures, and has none of the caller's
    assert theirs["prefix"] == sibling.prefix
    assert theirs["limits"]["requests_per_minute"]["key"]["used"] == 0
    assert theirs["limits"]["daily_tokens"]["key"]["used"] == 0
    assert theirs["limits"]["daily_tokens"]["tenant"]["used"] == spent
    assert theirs["limits"]["requests_per_minute"]["tenant"]["used"] == 2
    # another tenant's key sees nothing of them at all
    assert (outsider["prefix"], outsider["tenant"]) == (stranger.prefix, stranger.tenant)
    for entry in outsider["limits"].values():
        for level in ("key", "tenant"):
            assert entry[level]["used"] == 0
    assert caller.prefix not in str(outsider) and caller.tenant not in str(outsider)


async def test_key_info_refusals_are_in_the_routes_dialect(e2e_stack: E2EStack) -> None:
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        openai_style = await client.get("/v1/key", headers={"Authorization": "Bearer nz_nope"})
        native = await client.get("/api/key")
    assert openai_style.status_code == 401
    assert openai_style.json()["error"]["code"] == "invalid_api_key"
    assert native.status_code == 401
    assert isinstance(native.json()["error"], str)
