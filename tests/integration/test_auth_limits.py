"""Request-time limits through /authorize (the real Limiter on a real Redis), and
failing closed when Redis or Postgres cannot be asked."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import IDENTITY_HEADER, Limits
from neuronetz_gateway.domain.limits import seconds_until_next_day
from neuronetz_gateway.domain.policy import PolicySettings
from neuronetz_gateway.settings import Settings
from tests.integration.auth_helpers import authorize, make_key, make_settings, running_app
from tests.support.redis_deployments import RedisDeployment
from tests.support.servers import ThrowawayRedis, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(database_url: str, redis_deployment: RedisDeployment, redis_prefix: str) -> Settings:
    """Auth on each Redis deployment in turn (single, Cluster, Sentinel, TLS)."""
    return make_settings(
        database_url,
        redis_deployment.url,
        redis_prefix,
        lease_ttl_seconds=1,
        redis_ca_file=redis_deployment.ca_file or "",
    )


async def test_fifty_concurrent_against_rpm_seven_admit_exactly_seven_per_key(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store, key=PolicySettings(rpm=7))
    async with running_app(settings, store) as (client, _):
        answers = await asyncio.gather(*(authorize(client, made.full) for _ in range(50)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 7
    assert statuses.count(429) == 43
    refused = next(a for a in answers if a.status_code == 429)
    assert json.loads(refused.content)["error"].startswith("requests per minute limit of this key")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-requests"] == "7"


async def test_fifty_concurrent_against_tenant_rpm_seven_admit_exactly_seven(
    settings: Settings, store: Store
) -> None:
    first = await make_key(store, tenant=PolicySettings(rpm=7))
    second = await make_key(store, tenant_name=first.record.tenant_name)
    async with running_app(settings, store) as (client, _):
        keys = [first.full, second.full] * 25
        answers = await asyncio.gather(
            *(authorize(client, k, uri="/v1/chat/completions") for k in keys)
        )
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 7
    refused = next(a for a in answers if a.status_code == 429)
    body = json.loads(refused.content)["error"]
    assert body["code"] == "rate_limit_exceeded"
    assert "tenant" in body["message"]


async def test_concurrency_limit_admits_exactly_k_and_an_unreleased_lease_expires(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store, key=PolicySettings(concurrency=3))
    async with running_app(settings, store) as (client, _):
        answers = await asyncio.gather(*(authorize(client, made.full) for _ in range(10)))
        assert [a.status_code for a in answers].count(200) == 3
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert (await authorize(client, made.full)).status_code == 429
        await asyncio.sleep(1.3)  # nobody released the leases: their TTL (1 s) ends
        answers = await asyncio.gather(*(authorize(client, made.full) for _ in range(10)))
        assert [a.status_code for a in answers].count(200) == 3


async def test_a_request_refused_by_the_tenant_consumes_nothing_of_the_key(
    settings: Settings, store: Store
) -> None:
    busy = await make_key(store, tenant=PolicySettings(rpm=2))
    quiet = await make_key(store, key=PolicySettings(rpm=3), tenant_name=busy.record.tenant_name)
    async with running_app(settings, store) as (client, _):
        assert (await authorize(client, busy.full)).status_code == 200
        assert (await authorize(client, busy.full)).status_code == 200
        for _ in range(5):  # refused by the tenant's limit
            answer = await authorize(client, quiet.full)
            assert answer.status_code == 429
            assert "tenant" in json.loads(answer.content)["error"]
        await store.update_tenant_policy(busy.record.tenant_name, {"rpm": 1000})
        await asyncio.sleep(0.3)  # the NOTIFY evicts the cached policy
        statuses = [(await authorize(client, quiet.full)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # the key's own 3 were all still there


async def test_a_spent_budget_refuses_until_the_next_utc_day(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store, key=PolicySettings(daily_tokens=100))
    redis = await open_redis(settings.redis_url, ca_file=settings.redis_ca_file or None)
    limiter = Limiter(redis, prefix=settings.redis_prefix, ledger=store)
    try:
        async with running_app(settings, store) as (client, _):
            ok = await authorize(client, made.full, uri="/v1/embeddings")
            assert ok.status_code == 200
            spent = await limiter.reserve(
                tenant_id=made.record.tenant_id,
                key_id=made.record.id,
                key_limits=Limits(daily_tokens=100),
                tenant_limits=Limits(),
                request_id=secrets.token_hex(8),
                tokens=100,
            )
            assert spent.allowed
            refused = await authorize(client, made.full, uri="/v1/embeddings")
    finally:
        await limiter.aclose()
        await close_redis(redis)
    assert refused.status_code == 429
    error = json.loads(refused.content)["error"]
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "insufficient_quota"
    expected = seconds_until_next_day(datetime.now(UTC))
    assert abs(int(refused.headers["retry-after"]) - expected) <= 2
    assert refused.headers["x-ratelimit-remaining-daily-tokens"] == "0"
    assert IDENTITY_HEADER not in refused.headers


async def test_redis_down_is_503_within_two_seconds_and_recovers_without_restart(
    database_url: str, redis_prefix: str, store: Store
) -> None:
    made = await make_key(store, key=PolicySettings(rpm=1000))
    server = ThrowawayRedis()
    try:
        settings = make_settings(
            database_url, server.url, redis_prefix, decision_timeout_seconds=1.0
        )
        async with running_app(settings, store) as (client, _):
            assert (await authorize(client, made.full)).status_code == 200
            server.stop()
            for uri in ("/api/chat", "/v1/chat/completions"):
                started = time.monotonic()
                answer = await authorize(client, made.full, uri=uri)
                assert time.monotonic() - started < 2.0
                assert answer.status_code == 503
                assert answer.headers["retry-after"] == "1"
                assert IDENTITY_HEADER not in answer.headers
            assert (await client.get("/readyz")).status_code == 503
            server.start()
            started = time.monotonic()
            while (await authorize(client, made.full)).status_code != 200:
                assert time.monotonic() - started < 5.0
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).status_code == 200
    finally:
        server.destroy()


async def test_postgres_down_for_an_uncached_key_is_503(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    dead = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0, max_size=2
    )
    try:
        async with running_app(settings, Store(dead), listen=False) as (client, _):
            started = time.monotonic()
            answer = await authorize(client, made.full)
            assert time.monotonic() - started < 2.0
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            # garbage still costs no I/O: a plain 401
            assert (await authorize(client, "nz_garbage")).status_code == 401
            assert (await client.get("/readyz")).status_code == 503
    finally:
        await dead.close()


async def test_health_ready_and_metrics(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    async with running_app(settings, store) as (client, _):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"redis": True, "postgres": True}
        await authorize(client, made.full)
        await authorize(client, made.full, uri="/api/pull")
        text = (await client.get("/metrics")).text
    assert 'nz_auth_decisions_total{outcome="allowed",reason="ok"}' in text
    assert 'nz_auth_decisions_total{outcome="refused",reason="blocked"}' in text
    assert "nz_auth_decision_seconds_bucket" in text
    assert "nz_auth_revocation_lag_seconds" in text
    assert "nz_auth_argon2_verifications_total" in text
