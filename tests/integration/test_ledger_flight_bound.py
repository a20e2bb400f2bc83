"""A shared ledger read for a budget rebuild lasts at most the ledger timeout."""

from __future__ import annotations

import asyncio

import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.domain.identity import Limits
from tests.integration.test_redis_limiter import (
    NOON,
    Clock,
    HeldLedger,
    admit,
    new_id,
    own_redis,
)
from tests.support.servers import ThrowawayRedis

__all__ = ["own_redis"]  # the fixture, imported for this module's tests


async def test_a_ledger_read_everyone_gave_up_on_ends_and_a_later_one_starts_afresh(
    own_redis: ThrowawayRedis, store: Store, redis_prefix: str
) -> None:
    # A census that never says "complete" (Postgres away with rows spooled): the shared
    # read (shielded from its callers' timeouts) polled the census every 50 ms for as
    # long as that lasted, one task per key and level, and every later caller joined
    # it: the counters it finally wrote were marked with when it began, minutes before.
    client = await open_redis(own_redis.url)
    clock = Clock(NOON)
    ledger = HeldLedger(store)  # answers only once released
    limiter = Limiter(
        client,
        prefix=redis_prefix,
        ledger=ledger,
        clock=clock,
        timeout_seconds=10.0,
        ledger_timeout_seconds=0.3,
    )
    tenant, key = new_id(), new_id()
    key_limits = Limits(daily_tokens=100)
    try:
        with pytest.raises(LimiterUnavailable):
            await admit(limiter, tenant, key, key_limits)
        flights = list(limiter._ledger_flights.values())
        await asyncio.sleep(0.6)
        assert all(f.done() for f in flights)
        assert limiter._ledger_flights == {}
        clock.advance(60)
        ledger.release.set()
        assert (await admit(limiter, tenant, key, key_limits)).allowed
        marks = [
            await client.get(k)
            async for k in client.scan_iter(match=f"{redis_prefix}:{{t{tenant}}}:*:rb")
        ]
    finally:
        await limiter.aclose()
        await client.aclose()
    assert marks and all(int(m) == (NOON + 60) * 1000 for m in marks)
