"""Single-use identities in a real Redis: one claim per request id, in or beside reserve."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import IdentityReplayed, Limiter
from neuronetz_gateway.domain.identity import Limits
from tests.support.redis_deployments import RedisDeployment

pytestmark = pytest.mark.integration

BUDGET = Limits(total_tokens=1000)
UNLIMITED = Limits()


def new_id() -> int:
    return 1_000_000 + secrets.randbelow(2_000_000_000)


@pytest.fixture
async def redis_client(redis_deployment: RedisDeployment) -> AsyncIterator[RedisClient]:
    """A client of each Redis deployment in turn (single, Cluster, Sentinel, TLS)."""
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    try:
        yield client
    finally:
        await close_redis(client)


@pytest.fixture
async def limiter(
    redis_client: RedisClient, redis_prefix: str, store: Store
) -> AsyncIterator[Limiter]:
    made = Limiter(redis_client, prefix=redis_prefix, ledger=store, timeout_seconds=10.0)
    try:
        yield made
    finally:
        await made.aclose()


def _expiry(seconds: float = 5.0) -> int:
    return int((time.time() + seconds) * 1000)


async def _reserve(limiter: Limiter, tenant: int, request_id: str, **extra: Any) -> Any:
    return await limiter.reserve(
        tenant_id=tenant,
        key_id=1,
        key_limits=BUDGET,
        tenant_limits=UNLIMITED,
        request_id=request_id,
        tokens=10,
        **extra,
    )


async def _total(redis_client: RedisClient, prefix: str, tenant: int) -> int:
    value = await redis_client.get(f"{prefix}:{{t{tenant}}}:bud:k1:total")
    return int(value or 0)


async def test_a_claim_succeeds_once_and_a_second_is_a_replay(limiter: Limiter) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    await limiter.claim_identity(tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry())
    with pytest.raises(IdentityReplayed):
        await limiter.claim_identity(
            tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry()
        )
    # another request id is another identity
    await limiter.claim_identity(
        tenant_id=tenant, request_id=secrets.token_hex(16), expires_at_ms=_expiry()
    )


async def test_concurrent_claims_of_one_identity_let_exactly_one_through(
    limiter: Limiter,
) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)

    async def claim() -> bool:
        try:
            await limiter.claim_identity(
                tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry()
            )
        except IdentityReplayed:
            return False
        return True

    results = await asyncio.gather(*(claim() for _ in range(20)))
    assert results.count(True) == 1


async def test_reserve_claims_in_its_own_script_and_a_replay_records_nothing(
    limiter: Limiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    # the first decision finds the budget counter missing and rebuilds it from the
    # ledger, then reruns: the rerun must not take its own first claim for a replay
    decision = await _reserve(limiter, tenant, request_id, single_use_until_ms=_expiry())
    assert decision.allowed
    assert await _total(redis_client, redis_prefix, tenant) == 10
    with pytest.raises(IdentityReplayed):
        await _reserve(limiter, tenant, request_id, single_use_until_ms=_expiry())
    with pytest.raises(IdentityReplayed):
        await limiter.claim_identity(
            tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry()
        )
    assert await _total(redis_client, redis_prefix, tenant) == 10  # the replay reserved nothing


async def test_a_claim_made_beside_reserve_is_seen_by_reserve(limiter: Limiter) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    await limiter.claim_identity(tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry())
    with pytest.raises(IdentityReplayed):
        await _reserve(limiter, tenant, request_id, single_use_until_ms=_expiry())


async def test_a_refused_reservation_still_uses_the_identity_up(limiter: Limiter) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    refused = await limiter.reserve(
        tenant_id=tenant,
        key_id=1,
        key_limits=Limits(total_tokens=5),
        tenant_limits=UNLIMITED,
        request_id=request_id,
        tokens=10,
        single_use_until_ms=_expiry(),
    )
    assert not refused.allowed
    with pytest.raises(IdentityReplayed):
        await limiter.claim_identity(
            tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry()
        )


async def test_reserve_without_a_claim_leaves_the_identity_unused(limiter: Limiter) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    await _reserve(limiter, tenant, request_id)
    await limiter.claim_identity(tenant_id=tenant, request_id=request_id, expires_at_ms=_expiry())


@pytest.mark.parametrize("claim", ["beside", "in_reserve"])
async def test_the_marker_lives_in_the_tenant_slot_until_the_identity_expires(
    limiter: Limiter, redis_client: RedisClient, redis_prefix: str, claim: str
) -> None:
    tenant, request_id = new_id(), secrets.token_hex(16)
    expires = _expiry(5.0)
    ways: dict[str, Callable[[], Any]] = {
        "beside": lambda: limiter.claim_identity(
            tenant_id=tenant, request_id=request_id, expires_at_ms=expires
        ),
        "in_reserve": lambda: _reserve(limiter, tenant, request_id, single_use_until_ms=expires),
    }
    await ways[claim]()
    marker = f"{redis_prefix}:{{t{tenant}}}:used:{request_id}"
    ttl_ms = await redis_client.pttl(marker)
    # the identity's remaining 5 s plus the 1 s grace (less what the calls took)
    assert 4000 < ttl_ms <= 6000
    # an identity already expired still gets a marker that outlives it briefly
    stale = secrets.token_hex(16)
    await limiter.claim_identity(tenant_id=tenant, request_id=stale, expires_at_ms=_expiry(-60.0))
    stale_ttl = await redis_client.pttl(f"{redis_prefix}:{{t{tenant}}}:used:{stale}")
    assert 0 < stale_ttl <= 1000
