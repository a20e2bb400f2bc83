"""A settle Redis did not take lands later, once (real Redis; SPEC section 5).

The settle-twice test runs on every deployment: a repeat (a retry of a settle
whose answer was lost) charges nothing again. The outage test uses a Redis of
its own and ``CLIENT PAUSE``: Redis keeps its data but answers nothing for
1.5 s, so the first settle times out and so do the first retries; the budget
must then show the real charge exactly once. (The limiter drops a connection
whose command timed out, and a paused Redis does not run a command of a
client that left: the lost-answer case is the settle-twice test's.)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.limits import Decision
from neuronetz_gateway.proxy.settle_retry import PendingSettle, SettleRetries
from tests.support.redis_deployments import RedisDeployment
from tests.support.servers import ThrowawayRedis

pytestmark = pytest.mark.integration

BUDGETS = Limits(daily_tokens=1000, monthly_tokens=5000, total_tokens=9000)


def _new_id() -> int:
    return 1_000_000 + secrets.randbelow(2_000_000_000)


async def _reserve(limiter: Limiter, tenant: int, key: int, tokens: int) -> Decision:
    return await limiter.reserve(
        tenant_id=tenant,
        key_id=key,
        key_limits=BUDGETS,
        tenant_limits=BUDGETS,
        request_id=secrets.token_hex(8),
        tokens=tokens,
    )


async def _settle(
    limiter: Limiter, tenant: int, key: int, held: Decision, reserved_at: float
) -> Allowance:
    return await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=300,
        actual=25,
        reserved_at=reserved_at,
        key_limits=BUDGETS,
        tenant_limits=BUDGETS,
        reservation_id=held.reservation_id,
    )


@pytest.fixture
async def deployment_client(redis_deployment: RedisDeployment) -> AsyncIterator[RedisClient]:
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    try:
        yield client
    finally:
        await close_redis(client)


async def test_a_settle_sent_twice_charges_once(
    deployment_client: RedisClient, redis_prefix: str, store: Store
) -> None:
    limiter = Limiter(deployment_client, prefix=redis_prefix, ledger=store, timeout_seconds=10)
    try:
        tenant, key = _new_id(), _new_id()
        now = time.time()
        held = await _reserve(limiter, tenant, key, 300)
        first = await _settle(limiter, tenant, key, held, now)
        again = await _settle(limiter, tenant, key, held, now)
        assert first.remaining_daily_tokens == again.remaining_daily_tokens == 1000 - 25
        assert again.remaining_total_tokens == 9000 - 25
        assert again.remaining_tokens is None  # no TPM limit set: nothing else moved
    finally:
        await limiter.aclose()


async def test_a_settle_during_an_outage_lands_once_redis_answers_again(store: Store) -> None:
    server = ThrowawayRedis()
    client = await open_redis(server.url)
    control = await open_redis(server.url)
    limiter = Limiter(client, prefix="nzsr", ledger=store, timeout_seconds=0.3)
    outcomes: list[str] = []
    retries = SettleRetries(limiter, reservation_ttl_seconds=60, on_outcome=outcomes.append)
    try:
        tenant, key = _new_id(), _new_id()
        reserved_at = time.time()
        held = await _reserve(limiter, tenant, key, 300)
        assert held.allowed
        await control.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        with pytest.raises(LimiterUnavailable):
            await _settle(limiter, tenant, key, held, reserved_at)
        retries.retry(
            PendingSettle(
                request_id="r-outage",
                tenant_id=tenant,
                key_id=key,
                reserved=300,
                actual=25,
                reserved_at=reserved_at,
                release_lease_id=None,
                reservation_id=held.reservation_id,
            )
        )
        async with asyncio.timeout(30):
            await retries.wait()
        assert outcomes[-1] == "landed"
        assert "failed" in outcomes  # it was down for the retries too, not only the first try
        after = await _reserve(limiter, tenant, key, 0)
        assert after.allowance.remaining_daily_tokens == 1000 - 25
        assert after.allowance.remaining_monthly_tokens == 5000 - 25
        assert after.allowance.remaining_total_tokens == 9000 - 25
    finally:
        await retries.aclose()
        await limiter.aclose()
        await close_redis(control)
        await close_redis(client)
        server.destroy()
