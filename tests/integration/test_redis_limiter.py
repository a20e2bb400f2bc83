"""The limiter against a real Redis (and the real Postgres ledger for budget rebuilds).

Each test uses the run's ``redis_prefix`` and its own random tenant ids, so
tests share the session Redis without seeing each other. Tests that flush,
stop or restart Redis start their own :class:`ThrowawayRedis`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from neuronetz_gateway.adapters.postgres.store import LedgerTotals, Store, open_pool
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.limits import Decision
from tests.support.redis_deployments import RedisDeployment
from tests.support.servers import ThrowawayRedis, free_port

pytestmark = pytest.mark.integration

NOON = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()
UNLIMITED = Limits()


class Clock:
    """A settable clock for the limiter (seconds since the epoch)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_id() -> int:
    """A tenant / key id no other test (nor the real tables' serials) will use."""
    return 1_000_000 + secrets.randbelow(2_000_000_000)


@pytest.fixture
async def redis_client(redis_deployment: RedisDeployment) -> AsyncIterator[RedisClient]:
    """A client of each deployment in turn: every test using it runs on all of them."""
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    try:
        yield client
    finally:
        await close_redis(client)


MakeLimiter = Callable[..., Limiter]


@pytest.fixture
async def make_limiter(
    redis_client: RedisClient, redis_prefix: str, store: Store
) -> AsyncIterator[MakeLimiter]:
    made: list[Limiter] = []

    def make(clock: Callable[[], float] = time.time, **options: Any) -> Limiter:
        # these tests are about exactness, not latency: a loaded CI box opening 50
        # connections at once must not turn into LimiterUnavailable
        options.setdefault("timeout_seconds", 10.0)
        limiter = Limiter(redis_client, prefix=redis_prefix, ledger=store, clock=clock, **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def admit(
    limiter: Limiter, tenant: int, key: int, key_limits: Limits, tenant_limits: Limits = UNLIMITED
) -> Decision:
    return await limiter.admit(
        tenant_id=tenant,
        key_id=key,
        key_limits=key_limits,
        tenant_limits=tenant_limits,
        request_id=secrets.token_hex(8),
    )


async def reserve(
    limiter: Limiter,
    tenant: int,
    key: int,
    tokens: int,
    key_limits: Limits,
    tenant_limits: Limits = UNLIMITED,
) -> Decision:
    return await limiter.reserve(
        tenant_id=tenant,
        key_id=key,
        key_limits=key_limits,
        tenant_limits=tenant_limits,
        request_id=secrets.token_hex(8),
        tokens=tokens,
    )


async def insert_ledger_row(
    store: Store, tenant: int, key: int, ts: datetime, prompt: int, completion: int
) -> None:
    await store.pool.execute(
        "INSERT INTO usage_log (request_id, ts, tenant_id, key_id, key_prefix, route, status,"
        " prompt_tokens, completion_tokens) VALUES ($1, $2, $3, $4, 'nz_test0000', 'chat', 200,"
        " $5, $6)",
        secrets.token_hex(16),
        ts,
        tenant,
        key,
        prompt,
        completion,
    )


# RPM ---------------------------------------------------------------------------


async def test_rpm_is_exact_under_concurrency_per_key(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    tenant, key = new_id(), new_id()
    # every admit in one request id and (mostly) one millisecond: each hit must still count
    decisions = await asyncio.gather(
        *(
            limiter.admit(
                tenant_id=tenant,
                key_id=key,
                key_limits=Limits(rpm=7),
                tenant_limits=UNLIMITED,
                request_id="same-id",
            )
            for _ in range(50)
        )
    )
    allowed = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(allowed) == 7
    assert sorted(d.allowance.remaining_requests or 0 for d in allowed) == list(range(7))
    assert all(d.allowance.limit_requests == 7 for d in decisions)
    assert {(d.reason, d.level, d.error_code) for d in refused} == {
        ("rpm", "key", "rate_limit_exceeded")
    }
    assert all(1 <= d.retry_after <= 60 for d in refused)
    assert all(d.lease_id is None for d in decisions)  # no concurrency limit, no lease


async def test_rpm_tenant_limit_is_shared_by_its_keys(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    tenant, key_a, key_b = new_id(), new_id(), new_id()
    key_limits, tenant_limits = Limits(rpm=100), Limits(rpm=7)
    decisions = await asyncio.gather(
        *(admit(limiter, tenant, key, key_limits, tenant_limits) for key in [key_a, key_b] * 25)
    )
    assert sum(d.allowed for d in decisions) == 7
    assert {(d.reason, d.level) for d in decisions if not d.allowed} == {("rpm", "tenant")}


async def test_a_zero_rpm_refuses_for_a_whole_window_without_failing(
    make_limiter: MakeLimiter,
) -> None:
    """The CLI refuses 0, but a 0 that reached Redis must refuse cleanly, not crash."""
    limiter = make_limiter()
    decision = await admit(limiter, new_id(), new_id(), Limits(rpm=0), Limits())
    assert not decision.allowed
    assert (decision.reason, decision.level, decision.retry_after) == ("rpm", "key", 60)


async def test_rpm_refused_by_tenant_consumes_nothing_of_the_key(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter(clock=Clock(NOON))
    tenant, key = new_id(), new_id()
    key_limits = Limits(rpm=5)
    for _ in range(3):
        assert (await admit(limiter, tenant, key, key_limits, Limits(rpm=3))).allowed
    for _ in range(4):
        refused = await admit(limiter, tenant, key, key_limits, Limits(rpm=3))
        assert (refused.reason, refused.level) == ("rpm", "tenant")
    # the tenant limit is lifted: the key has exactly its 5 - 3 left, the refusals took nothing
    results = [(await admit(limiter, tenant, key, key_limits, Limits(rpm=1000))) for _ in range(3)]
    assert [d.allowed for d in results] == [True, True, False]
    assert (results[-1].reason, results[-1].level) == ("rpm", "key")


async def test_rpm_window_slides_and_retry_after_names_the_oldest_hit(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(rpm=2)
    assert (await admit(limiter, tenant, key, limits)).allowed  # t = 0
    clock.advance(20.5)
    assert (await admit(limiter, tenant, key, limits)).allowed  # t = 20.5
    clock.advance(10)
    refused = await admit(limiter, tenant, key, limits)  # t = 30.5: the first leaves at 60
    assert (refused.allowed, refused.retry_after) == (False, 30)
    clock.advance(29.5)  # t = 60: the first hit is out
    assert (await admit(limiter, tenant, key, limits)).allowed
    refused = await admit(limiter, tenant, key, limits)  # the second leaves at 80.5
    assert (refused.allowed, refused.retry_after) == (False, 21)


# concurrency ---------------------------------------------------------------------


async def test_concurrency_admits_exactly_k_and_release_frees(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    tenant, key = new_id(), new_id()
    limits = Limits(concurrency=3)
    decisions = await asyncio.gather(*(admit(limiter, tenant, key, limits) for _ in range(20)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 3
    assert len({d.lease_id for d in allowed}) == 3
    assert all(d.lease_id for d in allowed)
    refused = [d for d in decisions if not d.allowed]
    assert {(d.reason, d.level, d.retry_after, d.lease_id) for d in refused} == {
        ("concurrency", "key", 1, None)
    }
    lease = allowed[0].lease_id
    assert lease is not None
    await limiter.release_lease(tenant_id=tenant, key_id=key, lease_id=lease)
    await limiter.release_lease(tenant_id=tenant, key_id=key, lease_id=lease)  # idempotent
    again = await asyncio.gather(*(admit(limiter, tenant, key, limits) for _ in range(5)))
    assert sum(d.allowed for d in again) == 1


async def test_tenant_concurrency_lease_is_released_at_both_levels(
    make_limiter: MakeLimiter,
) -> None:
    limiter = make_limiter()
    tenant, key_a, key_b = new_id(), new_id(), new_id()
    key_limits, tenant_limits = Limits(concurrency=1), Limits(concurrency=1)
    held = await admit(limiter, tenant, key_a, key_limits, tenant_limits)
    assert held.allowed
    assert held.lease_id is not None
    refused = await admit(limiter, tenant, key_b, key_limits, tenant_limits)
    assert (refused.reason, refused.level) == ("concurrency", "tenant")
    await limiter.release_lease(tenant_id=tenant, key_id=key_a, lease_id=held.lease_id)
    assert (await admit(limiter, tenant, key_b, key_limits, tenant_limits)).allowed


async def test_settle_releases_the_lease_in_the_same_round_trip(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    limiter = make_limiter(clock=Clock(NOON))
    tenant, key = new_id(), new_id()
    key_limits, tenant_limits = Limits(concurrency=1, daily_tokens=100), Limits(concurrency=1)
    held = await admit(limiter, tenant, key, key_limits, tenant_limits)
    assert held.allowed
    assert held.lease_id is not None
    assert (await reserve(limiter, tenant, key, 50, key_limits, tenant_limits)).allowed
    assert not (await admit(limiter, tenant, key, key_limits, tenant_limits)).allowed
    base = f"{redis_prefix}:{{t{tenant}}}"
    assert await redis_client.zcard(f"{base}:conc:k{key}") == 1
    assert await redis_client.zcard(f"{base}:conc:t") == 1
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=50,
        actual=20,
        reserved_at=NOON,
        release_lease_id=held.lease_id,
    )
    assert allowance.remaining_daily_tokens is None  # no limits passed: not read back
    assert await redis_client.zcard(f"{base}:conc:k{key}") == 0
    assert await redis_client.zcard(f"{base}:conc:t") == 0
    again = await admit(limiter, tenant, key, key_limits, tenant_limits)
    assert again.allowed
    assert again.allowance.remaining_daily_tokens == 80  # and the settlement happened


async def test_unreleased_lease_comes_back_after_ttl_unless_renewed(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock, lease_ttl_seconds=1)
    tenant, key = new_id(), new_id()
    limits = Limits(concurrency=2)
    crashed = await admit(limiter, tenant, key, limits)  # its replica dies: never released
    streaming = await admit(limiter, tenant, key, limits)
    assert crashed.allowed
    assert streaming.allowed
    assert streaming.lease_id is not None
    assert not (await admit(limiter, tenant, key, limits)).allowed
    clock.advance(0.8)
    await limiter.renew_lease(tenant_id=tenant, key_id=key, lease_id=streaming.lease_id)
    clock.advance(0.7)  # 1.5 s: the crashed lease expired, the renewed one runs to 1.8
    assert (await admit(limiter, tenant, key, limits)).allowed
    assert not (await admit(limiter, tenant, key, limits)).allowed


async def test_no_limits_means_no_state(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    limiter = make_limiter()
    tenant, key = new_id(), new_id()
    for _ in range(20):
        decision = await admit(limiter, tenant, key, UNLIMITED)
        assert decision == Decision(allowed=True)
    assert (await reserve(limiter, tenant, key, 10**9, UNLIMITED)).allowed
    assert await redis_client.keys(f"{redis_prefix}:{{t{tenant}}}:*") == []


# TPM ---------------------------------------------------------------------------------


async def test_tpm_refuses_when_the_window_is_spent(make_limiter: MakeLimiter) -> None:
    clock = Clock(NOON + 0.5)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=100)
    first = await reserve(limiter, tenant, key, 60, limits)
    assert first.allowed
    assert (first.allowance.limit_tokens, first.allowance.remaining_tokens) == (100, 40)
    clock.advance(10)
    too_many = await reserve(limiter, tenant, key, 50, limits)
    assert (too_many.allowed, too_many.reason, too_many.level) == (False, "tpm", "key")
    assert too_many.error_code == "rate_limit_exceeded"
    assert too_many.retry_after == 50  # the 60 tokens of second 0 leave at 60, now is 10.5
    assert (await admit(limiter, tenant, key, limits)).allowed  # 60 < 100: room left
    assert (await reserve(limiter, tenant, key, 40, limits)).allowed  # exactly full
    spent = await admit(limiter, tenant, key, limits)
    assert (spent.allowed, spent.reason, spent.retry_after) == (False, "tpm", 50)
    never = await reserve(limiter, tenant, key, 101, limits)
    assert (never.allowed, never.retry_after) == (False, 60)
    clock.advance(50)  # 60.5: the first bucket left, 60 tokens free
    assert (await reserve(limiter, tenant, key, 60, limits)).allowed
    clock.advance(61)
    assert (await reserve(limiter, tenant, key, 100, limits)).allowed


async def test_tpm_tenant_window_shared_by_keys(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=Clock(NOON))
    tenant, key_a, key_b = new_id(), new_id(), new_id()
    tenant_limits = Limits(tpm=100)
    assert (await reserve(limiter, tenant, key_a, 70, UNLIMITED, tenant_limits)).allowed
    refused = await reserve(limiter, tenant, key_b, 31, UNLIMITED, tenant_limits)
    assert (refused.reason, refused.level) == ("tpm", "tenant")
    assert (await reserve(limiter, tenant, key_b, 30, UNLIMITED, tenant_limits)).allowed


async def _tpm_hash(redis_client: RedisClient, key: str) -> tuple[dict[int, int], int, int]:
    """A TPM HASH's buckets (second -> tokens) and its running totals (sum, oldest)."""
    raw = {int(f): int(v) for f, v in (await redis_client.hgetall(key)).items()}
    total, oldest = raw.pop(0, -1), raw.pop(1, -1)
    raw.pop(2, None)  # when its TTL was last set
    return raw, total, oldest


async def test_tpm_running_totals_follow_every_bucket_change(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    """decide.lua sums the window from the totals kept beside the buckets: reserves,
    settles (up, down, down past zero) and buckets leaving the window all keep them
    equal to the buckets, and the answers equal the buckets' own sum."""
    clock = Clock(NOON + 0.25)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=1000)
    tpm_key = f"{redis_prefix}:{{t{tenant}}}:tpm:k{key}"

    async def check(expect_window: int) -> None:
        buckets, total, oldest = await _tpm_hash(redis_client, tpm_key)
        assert total == sum(buckets.values())
        assert oldest == min(buckets)
        seen = (await admit(limiter, tenant, key, limits)).allowance
        assert seen.remaining_tokens == 1000 - expect_window

    first = await reserve(limiter, tenant, key, 300, limits)
    await check(300)
    clock.advance(20)
    second = await reserve(limiter, tenant, key, 200, limits)
    await check(500)
    # settle the first down (300 -> 100), the second up (200 -> 250)
    await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=300,
        actual=100,
        reserved_at=NOON + 0.25,
        reservation_id=first.reservation_id,
    )
    await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=200,
        actual=250,
        reserved_at=NOON + 20.25,
        reservation_id=second.reservation_id,
    )
    await check(350)
    # a settle past zero (no reservation record: the whole delta, clamped at 0)
    await limiter.settle(
        tenant_id=tenant, key_id=key, reserved=400, actual=0, reserved_at=NOON + 0.25
    )
    await check(250)  # the first bucket is 0, not -300
    clock.advance(45)  # NOON + 65.25: the first second left the window
    third = await reserve(limiter, tenant, key, 700, limits)
    assert third.allowed  # 250 + 700 <= 1000
    await check(950)
    buckets, _, _ = await _tpm_hash(redis_client, tpm_key)
    assert int(NOON) not in buckets  # deleted once it left
    refused = await reserve(limiter, tenant, key, 60, limits)
    # refused with the retry-after of the buckets themselves: the 250 of NOON+20 leave at +80
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "tpm", 15)
    clock.advance(60)  # every bucket left
    assert (await admit(limiter, tenant, key, limits)).allowance.remaining_tokens == 1000
    assert not await redis_client.exists(tpm_key)


async def test_tpm_window_without_running_totals_is_summed(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    """A TPM HASH without the totals (written by an earlier release, or one whose
    decide.lua deleted them as long-gone seconds) is summed from its buckets, and
    the totals are written for the next decision."""
    clock = Clock(NOON + 0.5)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=100)
    tpm_key = f"{redis_prefix}:{{t{tenant}}}:tpm:k{key}"
    now = int(NOON)
    await redis_client.hset(tpm_key, mapping={now - 70: 50, now - 30: 40, now - 1: 20})
    await redis_client.expire(tpm_key, 120)
    decision = await admit(limiter, tenant, key, limits)
    assert decision.allowance.remaining_tokens == 40  # 40 + 20 in the window; 50 left it
    buckets, total, oldest = await _tpm_hash(redis_client, tpm_key)
    assert (buckets, total, oldest) == ({now - 30: 40, now - 1: 20}, 60, now - 30)
    # the totals lost again (an earlier release's decide.lua deletes fields "0" and "1")
    await redis_client.hdel(tpm_key, "0", "1")
    refused = await reserve(limiter, tenant, key, 41, limits)
    assert (refused.allowed, refused.reason) == (False, "tpm")
    assert (await reserve(limiter, tenant, key, 40, limits)).allowed
    buckets, total, oldest = await _tpm_hash(redis_client, tpm_key)
    assert (total, oldest) == (100, now - 30)
    assert buckets == {now - 30: 40, now - 1: 20, now: 40}


async def test_tpm_hash_ttl_is_set_every_ten_seconds(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    """A reserve sets the TPM HASH's 120 s TTL only when the last one it set is 10 s
    old (the hash then outlives its newest bucket by at least 110 s, its minute in
    the window with room to spare); the second it was set is kept in field "2"."""
    clock = Clock(NOON + 0.5)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=10**6)
    tpm_key = f"{redis_prefix}:{{t{tenant}}}:tpm:k{key}"
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed
    assert await redis_client.hget(tpm_key, "2") == str(int(NOON)).encode()
    assert 110 < await redis_client.ttl(tpm_key) <= 120
    await redis_client.expire(tpm_key, 100)  # so that a reset would show
    clock.advance(9)
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed
    assert await redis_client.hget(tpm_key, "2") == str(int(NOON)).encode()
    assert await redis_client.ttl(tpm_key) <= 100  # not set again
    clock.advance(1)
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed
    assert await redis_client.hget(tpm_key, "2") == str(int(NOON) + 10).encode()
    assert 110 < await redis_client.ttl(tpm_key) <= 120
    # a clock behind the one that set it (another replica) sets it too
    clock.advance(-3)
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed
    assert await redis_client.hget(tpm_key, "2") == str(int(NOON) + 7).encode()
    _, total, _ = await _tpm_hash(redis_client, tpm_key)
    assert total == 40


# budgets -------------------------------------------------------------------------------


async def test_daily_budget_refuses_until_next_utc_day(make_limiter: MakeLimiter) -> None:
    clock = Clock(datetime(2026, 11, 26, 23, 59, 30, tzinfo=UTC).timestamp())
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(daily_tokens=100)
    first = await reserve(limiter, tenant, key, 100, limits)
    assert first.allowed
    assert first.allowance.remaining_daily_tokens == 0
    refused = await admit(limiter, tenant, key, limits)
    assert (refused.allowed, refused.reason, refused.level) == (False, "daily_tokens", "key")
    assert refused.error_code == "budget_exceeded"
    assert refused.retry_after == 30
    assert refused.allowance.remaining_daily_tokens == 0
    clock.now = datetime(2026, 11, 27, 0, 0, 5, tzinfo=UTC).timestamp()
    fresh = await admit(limiter, tenant, key, limits)
    assert fresh.allowed
    assert fresh.allowance.remaining_daily_tokens == 100


async def test_monthly_and_total_budgets(make_limiter: MakeLimiter) -> None:
    clock = Clock(datetime(2026, 11, 30, 23, 0, 0, tzinfo=UTC).timestamp())
    # the reservations stand for spent tokens here: they must outlive the test's hour
    limiter = make_limiter(clock=clock, reservation_ttl_seconds=7200)
    tenant, key = new_id(), new_id()
    tenant_limits = Limits(monthly_tokens=50, total_tokens=80)
    assert (await reserve(limiter, tenant, key, 50, UNLIMITED, tenant_limits)).allowed
    refused = await admit(limiter, tenant, key, UNLIMITED, tenant_limits)
    assert (refused.reason, refused.level, refused.retry_after) == (
        "monthly_tokens",
        "tenant",
        3600,
    )
    clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    # new month: 50 fit again, but only 30 of the total are left
    over_total = await reserve(limiter, tenant, key, 31, UNLIMITED, tenant_limits)
    assert (over_total.reason, over_total.retry_after) == ("total_tokens", 86_400)
    assert over_total.allowance.remaining_total_tokens == 30
    assert over_total.allowance.remaining_monthly_tokens == 50
    assert (await reserve(limiter, tenant, key, 30, UNLIMITED, tenant_limits)).allowed
    spent = await admit(limiter, tenant, key, UNLIMITED, tenant_limits)
    assert (spent.reason, spent.retry_after) == ("total_tokens", 86_400)


async def test_reserve_is_all_or_nothing(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=Clock(NOON))
    tenant, key_1, key_2 = new_id(), new_id(), new_id()
    tenant_limits = Limits(daily_tokens=100, tpm=1000)
    assert (
        await reserve(limiter, tenant, key_1, 40, Limits(daily_tokens=50), tenant_limits)
    ).allowed
    refused = await reserve(limiter, tenant, key_1, 20, Limits(daily_tokens=50), tenant_limits)
    assert (refused.reason, refused.level) == ("daily_tokens", "key")
    # the refused 20 reached neither the tenant budget nor its TPM window
    fits = await reserve(limiter, tenant, key_2, 60, UNLIMITED, tenant_limits)
    assert fits.allowed
    assert fits.allowance.remaining_tokens == 900
    assert fits.allowance.remaining_daily_tokens == 0
    refused = await reserve(limiter, tenant, key_2, 1, UNLIMITED, tenant_limits)
    assert (refused.reason, refused.level) == ("daily_tokens", "tenant")
    # and a tenant refusal left key_1's own budget alone: 10 of its 50 remain
    still = await reserve(limiter, tenant, key_1, 10, Limits(daily_tokens=50), Limits())
    assert still.allowed


async def test_concurrent_reserves_never_overspend(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    tenant, key = new_id(), new_id()
    key_limits, tenant_limits = Limits(total_tokens=100), Limits(daily_tokens=1000)
    decisions = await asyncio.gather(
        *(reserve(limiter, tenant, key, 10, key_limits, tenant_limits) for _ in range(30))
    )
    assert sum(d.allowed for d in decisions) == 10
    assert {d.reason for d in decisions if not d.allowed} == {"total_tokens"}


async def test_settle_corrects_budgets_and_tpm(make_limiter: MakeLimiter) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    key_limits, tenant_limits = Limits(daily_tokens=100), Limits(tpm=100, total_tokens=1000)
    assert (await reserve(limiter, tenant, key, 100, key_limits, tenant_limits)).allowed
    reserved_at = clock()
    assert not (await admit(limiter, tenant, key, key_limits, tenant_limits)).allowed
    clock.advance(2)
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=100,
        actual=30,
        reserved_at=reserved_at,
        key_limits=key_limits,
        tenant_limits=tenant_limits,
    )
    assert allowance.remaining_daily_tokens == 70
    assert allowance.remaining_total_tokens == 970
    assert allowance.remaining_tokens == 70  # the reservation's TPM bucket shrank too
    assert (await reserve(limiter, tenant, key, 70, key_limits, tenant_limits)).allowed
    refused = await reserve(limiter, tenant, key, 1, key_limits, tenant_limits)
    assert refused.reason in {"daily_tokens", "tpm"}
    # more than reserved (an estimate that was short) is charged too
    await limiter.settle(tenant_id=tenant, key_id=key, reserved=70, actual=90, reserved_at=clock())
    final = await admit(limiter, tenant, key, key_limits, tenant_limits)
    assert final.allowance.remaining_daily_tokens == 0
    assert final.allowance.remaining_total_tokens == 1000 - 30 - 90
    # without limits, settle cannot say what remains
    assert (
        await limiter.settle(
            tenant_id=tenant, key_id=key, reserved=0, actual=0, reserved_at=clock()
        )
    ).remaining_daily_tokens is None


async def test_settle_ignores_expired_bucket_and_keeps_the_reservations_day(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC).timestamp())
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=1000, daily_tokens=100, monthly_tokens=1000)
    assert (await reserve(limiter, tenant, key, 50, limits)).allowed
    reserved_at = clock()
    clock.advance(120)  # next UTC day, and the reservation's TPM bucket left the window
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed  # today's bucket
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=50,
        actual=250,
        reserved_at=reserved_at,
        key_limits=limits,
    )
    assert allowance.remaining_tokens == 990  # the old bucket was not resurrected
    assert allowance.remaining_daily_tokens == 90  # yesterday's counter took the +200
    assert allowance.remaining_monthly_tokens == 1000 - 250 - 10


async def test_settle_finds_the_bucket_when_reserve_crossed_a_second(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(NOON + 0.999)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(tpm=100)
    reserved_at = clock()  # the proxy reads its clock, then calls reserve...
    clock.advance(0.002)  # ...which lands in the next second's bucket
    assert (await reserve(limiter, tenant, key, 100, limits)).allowed
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=100,
        actual=10,
        reserved_at=reserved_at,
        key_limits=limits,
    )
    assert allowance.remaining_tokens == 90


async def test_settle_never_drives_a_counter_negative(make_limiter: MakeLimiter) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock)
    tenant, key = new_id(), new_id()
    limits = Limits(daily_tokens=100, tpm=100)
    assert (await reserve(limiter, tenant, key, 10, limits)).allowed
    allowance = await limiter.settle(
        tenant_id=tenant, key_id=key, reserved=50, actual=0, reserved_at=clock(), key_limits=limits
    )
    assert allowance.remaining_daily_tokens == 100
    assert allowance.remaining_tokens == 100
    assert not (await reserve(limiter, tenant, key, 101, limits)).allowed


# layout ------------------------------------------------------------------------------


async def test_redis_layout_and_expiries(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    limiter = make_limiter()
    tenant, key = new_id(), new_id()
    limits = Limits(rpm=10, tpm=1000, concurrency=2, daily_tokens=10**6, monthly_tokens=10**7)
    tenant_limits = Limits(total_tokens=10**8)
    decision = await admit(limiter, tenant, key, limits, tenant_limits)
    assert decision.allowed
    assert (await reserve(limiter, tenant, key, 5, limits, tenant_limits)).allowed
    now = datetime.now(UTC)
    base = f"{redis_prefix}:{{t{tenant}}}"
    day, month = now.strftime("%Y%m%d"), now.strftime("%Y%m")
    assert 0 < await redis_client.pttl(f"{base}:rpm:k{key}") <= 61_000
    assert 0 < await redis_client.pttl(f"{base}:conc:k{key}") <= 61_000
    assert 0 < await redis_client.ttl(f"{base}:tpm:k{key}") <= 120
    assert 86_400 < await redis_client.ttl(f"{base}:bud:k{key}:d:{day}") <= 2 * 86_400
    assert 31 * 86_400 < await redis_client.ttl(f"{base}:bud:k{key}:m:{month}") <= 32 * 86_400
    assert await redis_client.ttl(f"{base}:bud:t:total") == -1  # the total never expires
    assert await redis_client.get(f"{base}:bud:t:total") == b"5"
    # the tenant has no RPM / TPM / concurrency limit: nothing kept for it
    for kind in ("rpm", "conc", "tpm"):
        assert not await redis_client.exists(f"{base}:{kind}:t")


# rebuild from the ledger ---------------------------------------------------------------


@pytest.fixture
async def own_redis() -> AsyncIterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    try:
        yield server
    finally:
        server.destroy()


async def test_budget_survives_flushall_through_the_ledger(
    own_redis: ThrowawayRedis, store: Store, redis_prefix: str
) -> None:
    client = await open_redis(own_redis.url)
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    limiter = Limiter(
        client,
        prefix=redis_prefix,
        ledger=store,
        clock=Clock(now.timestamp()),
        timeout_seconds=10.0,
    )
    tenant, key, other_key = new_id(), new_id(), new_id()
    key_limits = Limits(daily_tokens=100, total_tokens=500)
    tenant_limits = Limits(monthly_tokens=900)
    try:
        assert (await reserve(limiter, tenant, key, 100, key_limits, tenant_limits)).allowed
        assert not (await admit(limiter, tenant, key, key_limits, tenant_limits)).allowed
        # what the audit writer recorded for that spend, plus older history
        await insert_ledger_row(store, tenant, key, now.replace(hour=9), 60, 40)
        await insert_ledger_row(store, tenant, key, now.replace(day=2), 300, 0)
        await insert_ledger_row(store, tenant, other_key, now.replace(day=3), 400, 50)
        await insert_ledger_row(store, tenant, key, now.replace(month=10), 50, 0)
        await client.flushall()

        refused = await admit(limiter, tenant, key, key_limits, tenant_limits)
        assert (refused.allowed, refused.reason, refused.level) == (False, "daily_tokens", "key")
        assert refused.allowance.remaining_daily_tokens == 0
        assert refused.allowance.remaining_total_tokens == 500 - 450
        assert refused.allowance.remaining_monthly_tokens == 900 - 850  # both keys, this month
        # the other key has its own daily budget (empty) and total (450 of 500 spent),
        # and shares the tenant's month (50 left)
        other = await reserve(limiter, tenant, other_key, 51, key_limits, tenant_limits)
        assert (other.reason, other.level) == ("monthly_tokens", "tenant")
        assert (await reserve(limiter, tenant, other_key, 50, key_limits, tenant_limits)).allowed
    finally:
        await limiter.aclose()
        await client.aclose()


class CountingLedger:
    """The real store, counting the rebuild queries it answers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[int | None] = []

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        self.calls.append(key_id)
        return await self.store.ledger_totals(
            tenant_id=tenant_id, key_id=key_id, day_start=day_start, month_start=month_start
        )


async def test_concurrent_rebuilds_share_one_ledger_query_per_level(
    store: Store, redis_client: RedisClient, redis_prefix: str
) -> None:
    ledger = CountingLedger(store)
    limiter = Limiter(
        redis_client, prefix=redis_prefix, ledger=ledger, clock=Clock(NOON), timeout_seconds=10.0
    )
    tenant, key = new_id(), new_id()
    await insert_ledger_row(store, tenant, key, datetime.fromtimestamp(NOON - 3600, UTC), 30, 0)
    key_limits, tenant_limits = Limits(daily_tokens=100), Limits(total_tokens=1000)
    try:
        decisions = await asyncio.gather(
            *(reserve(limiter, tenant, key, 10, key_limits, tenant_limits) for _ in range(30))
        )
    finally:
        await limiter.aclose()
    assert sum(d.allowed for d in decisions) == 7  # 30 already spent per the ledger
    # callers that saw the counters missing while the first rebuild was in flight
    # waited for it; without that it would be 30 queries per level
    assert set(ledger.calls) == {key, None}
    assert ledger.calls.count(key) <= 3
    assert ledger.calls.count(None) <= 3


async def test_rebuild_fails_closed_when_the_ledger_is_down(
    make_limiter: MakeLimiter,
    database_url: str,
    redis_client: RedisClient,
    redis_prefix: str,
) -> None:
    pool = await open_pool(database_url, min_size=1, max_size=1)
    await pool.close()  # a ledger that cannot answer
    limiter = Limiter(redis_client, prefix=redis_prefix, ledger=Store(pool))
    tenant, key = new_id(), new_id()
    try:
        with pytest.raises(LimiterUnavailable, match="ledger"):
            await admit(limiter, tenant, key, Limits(daily_tokens=10))
        # limits that need no ledger still work
        assert (await admit(limiter, tenant, key, Limits(rpm=10))).allowed
    finally:
        await limiter.aclose()


# outages -------------------------------------------------------------------------------


async def _fails_fast(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        await call()
    return time.monotonic() - started


async def test_redis_down_fails_closed_fast_and_recovers_without_restart(
    store: Store, redis_prefix: str
) -> None:
    port = free_port()
    server = ThrowawayRedis(port=port)
    client = await open_redis(server.url)
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    limiter = Limiter(client, prefix=redis_prefix, ledger=store, clock=Clock(now.timestamp()))
    tenant, key = new_id(), new_id()
    limits = Limits(rpm=100, concurrency=5, daily_tokens=100)
    try:
        assert (await reserve(limiter, tenant, key, 100, limits)).allowed
        assert await limiter.ping()
        server.stop()

        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: admit(limiter, tenant, key, limits),
            lambda: reserve(limiter, tenant, key, 1, limits),
            lambda: limiter.settle(
                tenant_id=tenant, key_id=key, reserved=1, actual=0, reserved_at=now.timestamp()
            ),
            lambda: limiter.renew_lease(tenant_id=tenant, key_id=key, lease_id="x"),
            lambda: limiter.release_lease(tenant_id=tenant, key_id=key, lease_id="x"),
        ]
        for call in calls:
            assert await _fails_fast(call) < 2.0
        assert not await limiter.ping()

        server.start()  # same port, empty: no scripts, no counters
        await insert_ledger_row(store, tenant, key, now.replace(hour=8), 70, 30)
        refused = await admit(limiter, tenant, key, limits)
        assert (refused.reason, refused.retry_after) == ("daily_tokens", 12 * 3600)
        assert await limiter.ping()
        ok = await admit(limiter, tenant, key, Limits(rpm=100, concurrency=5))
        assert ok.allowed
        assert ok.lease_id is not None
    finally:
        await limiter.aclose()
        await client.aclose()
        server.destroy()


async def test_redis_that_never_answers_times_out(store: Store, redis_prefix: str) -> None:
    hung: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # socket timeouts far beyond ours: only the limiter's own bound can end the wait
    client: aioredis.Redis = aioredis.Redis(
        host="127.0.0.1", port=port, socket_timeout=30, socket_connect_timeout=30
    )
    limiter = Limiter(client, prefix=redis_prefix, ledger=store, timeout_seconds=0.3)
    try:
        elapsed = await _fails_fast(lambda: admit(limiter, new_id(), new_id(), Limits(rpm=1)))
        assert elapsed < 1.5
        assert not await limiter.ping()
    finally:
        await limiter.aclose()
        await client.aclose()
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


# reservations a proxy never settled (SPEC section 13: a killed replica leaks nothing)

BUDGETS = Limits(daily_tokens=1000, monthly_tokens=5000, total_tokens=9000)


async def test_a_reservation_never_settled_is_released_after_its_ttl(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock, reservation_ttl_seconds=2)
    tenant, key = new_id(), new_id()
    held = await reserve(limiter, tenant, key, 300, BUDGETS, BUDGETS)
    assert held.allowed
    assert held.reservation_id is not None
    clock.advance(1.9)
    still = await reserve(limiter, tenant, key, 0, BUDGETS, BUDGETS)
    assert still.allowance.remaining_daily_tokens == 700  # within its TTL: held
    clock.advance(0.2)  # the proxy died: nobody settles
    after = await reserve(limiter, tenant, key, 0, BUDGETS, BUDGETS)
    assert after.allowance.remaining_daily_tokens == 1000
    assert after.allowance.remaining_monthly_tokens == 5000
    assert after.allowance.remaining_total_tokens == 9000
    assert (await reserve(limiter, tenant, key, 1000, BUDGETS, BUDGETS)).allowed


async def test_a_settle_after_the_sweep_charges_exactly_the_actual(
    make_limiter: MakeLimiter,
) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock, reservation_ttl_seconds=2)
    tenant, key = new_id(), new_id()
    held = await reserve(limiter, tenant, key, 300, BUDGETS, BUDGETS)
    clock.advance(3)
    await reserve(limiter, tenant, key, 0, BUDGETS, BUDGETS)  # sweeps it
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=300,
        actual=120,
        reserved_at=NOON,
        key_limits=BUDGETS,
        tenant_limits=BUDGETS,
        reservation_id=held.reservation_id,
    )
    assert allowance.remaining_daily_tokens == 1000 - 120
    assert allowance.remaining_monthly_tokens == 5000 - 120
    assert allowance.remaining_total_tokens == 9000 - 120
    clock.advance(3)  # and nothing is left to sweep twice
    later = await reserve(limiter, tenant, key, 0, BUDGETS, BUDGETS)
    assert later.allowance.remaining_daily_tokens == 1000 - 120


async def test_a_settle_in_time_corrects_by_the_difference_and_leaves_only_a_mark(
    make_limiter: MakeLimiter, redis_client: RedisClient, redis_prefix: str
) -> None:
    clock = Clock(NOON)
    limiter = make_limiter(clock=clock, reservation_ttl_seconds=2)
    tenant, key = new_id(), new_id()
    held = await reserve(limiter, tenant, key, 300, BUDGETS, BUDGETS)
    base = f"{redis_prefix}:{{t{tenant}}}"
    assert await redis_client.zcard(f"{base}:resv") == 1
    clock.advance(1)
    allowance = await limiter.settle(
        tenant_id=tenant,
        key_id=key,
        reserved=300,
        actual=120,
        reserved_at=NOON,
        key_limits=BUDGETS,
        tenant_limits=BUDGETS,
        reservation_id=held.reservation_id,
    )
    assert allowance.remaining_daily_tokens == 1000 - 120
    # the record is now only the mark a repeated settle finds (to charge nothing twice)
    assert await redis_client.hget(f"{base}:resv:rec", held.reservation_id or "") in {
        b"settled",
        "settled",
    }
    clock.advance(3)  # past the TTL: the settled reservation is not taken back again
    later = await reserve(limiter, tenant, key, 0, BUDGETS, BUDGETS)
    assert later.allowance.remaining_daily_tokens == 1000 - 120
    assert later.allowance.remaining_total_tokens == 9000 - 120
    assert await redis_client.zcard(f"{base}:resv") == 0  # and the mark was swept
    assert await redis_client.hlen(f"{base}:resv:rec") == 0


@pytest.mark.parametrize("row_before_rebuild", [True, False])
async def test_a_settle_after_a_rebuild_charges_only_what_the_ledger_lacked(
    own_redis: ThrowawayRedis, store: Store, redis_prefix: str, row_before_rebuild: bool
) -> None:
    # Redis loses a reservation with its counters; a retried settle lands after the
    # counters were rebuilt. If the request's row was queued before that rebuild read
    # the ledger, the counter holds the request already: charging it again counted it
    # twice (chaos c: budget - ledger = +25). If not, the settle must charge it.
    client = await open_redis(own_redis.url)
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    clock = Clock(now.timestamp())
    limiter = Limiter(client, prefix=redis_prefix, ledger=store, clock=clock, timeout_seconds=10.0)
    tenant, key = new_id(), new_id()
    key_limits = Limits(daily_tokens=1000)
    try:
        held = await reserve(limiter, tenant, key, 100, key_limits)
        assert held.allowed and held.reservation_id is not None
        reserved_at = clock()
        clock.advance(1)
        audited_at = clock()
        if row_before_rebuild:  # the request ended, its row queued (and written)
            await insert_ledger_row(store, tenant, key, now, 20, 10)
        await client.flushall()  # a restart: reservation and counters gone
        clock.advance(1)
        assert (await admit(limiter, tenant, key, key_limits)).allowed  # the rebuild
        if not row_before_rebuild:  # the request ends after the rebuild
            clock.advance(1)
            audited_at = clock()
            await insert_ledger_row(store, tenant, key, now, 20, 10)
        await limiter.settle(
            tenant_id=tenant,
            key_id=key,
            reserved=100,
            actual=30,
            reserved_at=reserved_at,
            reservation_id=held.reservation_id,
            audited_at=audited_at,
        )
        after = await admit(limiter, tenant, key, key_limits)
        assert after.allowance.remaining_daily_tokens == 1000 - 30  # once, either way
    finally:
        await limiter.aclose()
        await client.aclose()


class HeldLedger(CountingLedger):
    """The real store, answering only once ``release`` is set."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.release = asyncio.Event()

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        await self.release.wait()
        return await super().ledger_totals(
            tenant_id=tenant_id, key_id=key_id, day_start=day_start, month_start=month_start
        )


async def test_a_rebuild_that_joined_a_ledger_read_marks_when_that_read_began(
    own_redis: ThrowawayRedis, store: Store, redis_prefix: str
) -> None:
    # the rebuilt mark promises "every row queued before this is in the counter": a caller
    # that joined a read begun earlier must not mark its own, later, time
    client = await open_redis(own_redis.url)
    clock = Clock(NOON)
    ledger = HeldLedger(store)
    limiter = Limiter(client, prefix=redis_prefix, ledger=ledger, clock=clock, timeout_seconds=10.0)
    tenant, key = new_id(), new_id()
    key_limits = Limits(daily_tokens=100)
    try:
        first = asyncio.ensure_future(admit(limiter, tenant, key, key_limits))
        await asyncio.sleep(0.2)  # its ledger read has begun (and waits)
        clock.advance(5)
        second = asyncio.ensure_future(admit(limiter, tenant, key, key_limits))
        await asyncio.sleep(0.2)
        ledger.release.set()
        await asyncio.gather(first, second)
        marks = [
            await client.get(k)
            async for k in client.scan_iter(match=f"{redis_prefix}:{{t{tenant}}}:*:rb")
        ]
    finally:
        await limiter.aclose()
        await client.aclose()
    assert ledger.calls == [key]  # one shared read
    assert marks and all(int(m) == NOON * 1000 for m in marks)
