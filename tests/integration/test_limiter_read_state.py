"""``Limiter.read_state`` on a real Redis: every limit kind at both levels, read without a trace.

The figures come from the same state ``admit`` / ``reserve`` keep; reading
them counts no request, takes no lease and rebuilds lost budget counters
from the Postgres ledger as a decision would.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.key_state import KeyState, LevelState, WindowState
from neuronetz_gateway.domain.limits import Decision
from tests.integration.test_redis_limiter import Clock, insert_ledger_row, new_id
from tests.support.redis_deployments import RedisDeployment

pytestmark = pytest.mark.integration

NOON = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
NOON_MS = int(NOON.timestamp() * 1000)


@pytest.fixture
async def redis_client(redis_deployment: RedisDeployment) -> AsyncIterator[RedisClient]:
    """A client of each Redis deployment in turn (single, Cluster, Sentinel, TLS)."""
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    try:
        yield client
    finally:
        await close_redis(client)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON.timestamp())


@pytest.fixture
async def limiter(
    redis_client: RedisClient, redis_prefix: str, store: Store, clock: Clock
) -> AsyncIterator[Limiter]:
    made = Limiter(redis_client, prefix=redis_prefix, ledger=store, clock=clock, timeout_seconds=10)
    try:
        yield made
    finally:
        await made.aclose()


async def _admit(limiter: Limiter, tenant: int, key: int, kl: Limits, tl: Limits) -> str | None:
    decision = await limiter.admit(
        tenant_id=tenant, key_id=key, key_limits=kl, tenant_limits=tl, request_id="r"
    )
    assert decision.allowed
    return decision.lease_id


async def _reserve(
    limiter: Limiter, tenant: int, key: int, tokens: int, kl: Limits, tl: Limits
) -> Decision:
    decision = await limiter.reserve(
        tenant_id=tenant,
        key_id=key,
        key_limits=kl,
        tenant_limits=tl,
        request_id=secrets.token_hex(4),
        tokens=tokens,
    )
    assert decision.allowed
    return decision


async def _state(limiter: Limiter, tenant: int, key: int, kl: Limits, tl: Limits) -> KeyState:
    return await limiter.read_state(tenant_id=tenant, key_id=key, key_limits=kl, tenant_limits=tl)


async def test_every_limit_kind_at_both_levels(limiter: Limiter, clock: Clock) -> None:
    tenant, key, other = new_id(), new_id(), new_id()
    kl = Limits(rpm=10, tpm=1000, concurrency=3, daily_tokens=500, monthly_tokens=600)
    tl = Limits(rpm=100, tpm=5000, concurrency=9, monthly_tokens=900, total_tokens=2000)
    await _admit(limiter, tenant, key, kl, tl)  # 12:00:00.000
    clock.advance(2.5)
    await _admit(limiter, tenant, key, kl, tl)  # 12:00:02.500
    await _reserve(limiter, tenant, key, 40, kl, tl)  # second 12:00:02
    clock.advance(1)
    await _admit(limiter, tenant, other, kl, tl)  # 12:00:03.500, the tenant's third
    await _reserve(limiter, tenant, other, 7, kl, tl)  # second 12:00:03
    clock.advance(1)

    state = await _state(limiter, tenant, key, kl, tl)
    assert state.read_at_ms == NOON_MS + 4500
    assert state.key == LevelState(
        requests=WindowState(2, NOON_MS + 60_000),  # the oldest hit leaving makes room
        tokens=WindowState(40, NOON_MS + 2000 + 60_000),
        concurrency=2,
        daily_tokens=40,
        monthly_tokens=40,
        total_tokens=None,  # no total budget on the key: not read
    )
    assert state.tenant == LevelState(
        requests=WindowState(3, NOON_MS + 60_000),
        tokens=WindowState(47, NOON_MS + 2000 + 60_000),
        concurrency=3,
        daily_tokens=None,
        monthly_tokens=47,
        total_tokens=47,
    )
    # the other key of the tenant has its own key-level figures
    theirs = await _state(limiter, tenant, other, kl, tl)
    assert theirs.key.requests == WindowState(1, NOON_MS + 3500 + 60_000)
    assert theirs.key.daily_tokens == 7
    assert theirs.tenant == state.tenant


async def test_reading_counts_no_request_and_takes_no_lease(limiter: Limiter, clock: Clock) -> None:
    tenant, key = new_id(), new_id()
    kl, tl = Limits(rpm=2, concurrency=1), Limits()
    for _ in range(20):
        state = await _state(limiter, tenant, key, kl, tl)
        assert state.key.requests == WindowState(0, None)
        assert state.key.concurrency == 0
    await _admit(limiter, tenant, key, kl, tl)
    clock.advance(10)
    lease = await limiter.admit(
        tenant_id=tenant, key_id=key, key_limits=kl, tenant_limits=tl, request_id="r"
    )
    assert not lease.allowed  # the concurrency slot is held by the first
    # a spent key can still read what it has left, and when it comes back
    state = await _state(limiter, tenant, key, kl, tl)
    assert state.key.requests == WindowState(1, NOON_MS + 60_000)
    assert state.key.concurrency == 1


async def test_at_the_limit_the_reset_is_when_the_binding_hit_leaves(
    limiter: Limiter, clock: Clock
) -> None:
    tenant, key = new_id(), new_id()
    kl = Limits(rpm=3)
    for _ in range(3):
        await _admit(limiter, tenant, key, kl, Limits())
        clock.advance(1)
    state = await _state(limiter, tenant, key, kl, Limits())
    assert state.key.requests == WindowState(3, NOON_MS + 60_000)
    # lowered to 2: two of the three must leave before there is room
    state = await _state(limiter, tenant, key, Limits(rpm=2), Limits())
    assert state.key.requests == WindowState(3, NOON_MS + 1000 + 60_000)
    clock.advance(60 - 3 + 0.5)  # the first hit has left the window
    state = await _state(limiter, tenant, key, kl, Limits())
    assert state.key.requests == WindowState(2, NOON_MS + 1000 + 60_000)


async def test_lost_budget_counters_are_rebuilt_from_the_ledger(
    limiter: Limiter, store: Store
) -> None:
    tenant, key, other = new_id(), new_id(), new_id()
    await insert_ledger_row(store, tenant, key, NOON.replace(hour=9), 60, 40)
    await insert_ledger_row(store, tenant, key, NOON.replace(day=2), 300, 0)
    await insert_ledger_row(store, tenant, other, NOON.replace(hour=8), 5, 5)
    kl = Limits(daily_tokens=1000, monthly_tokens=1000, total_tokens=1000)
    tl = Limits(daily_tokens=1000)
    state = await _state(limiter, tenant, key, kl, tl)
    assert (state.key.daily_tokens, state.key.monthly_tokens, state.key.total_tokens) == (
        100,
        400,
        400,
    )
    assert state.tenant.daily_tokens == 110
