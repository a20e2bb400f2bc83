"""Each Redis deployment gets the client that speaks it, and the limiter runs on it.

The limiter and auth suites run on every deployment (``redis_deployment``);
these tests pin what differs between them: which client ``open_redis``
picks, that a Cluster's per-tenant keys stay in one slot, that TLS verifies
the server against ``NZ_REDIS_CA_FILE``.
"""

from __future__ import annotations

import secrets

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.domain.identity import Limits
from tests.support.redis_deployments import RedisDeployment, start_deployment

pytestmark = pytest.mark.integration

PIPELINED = {"single": True, "tls": True, "cluster": False, "sentinel": False}


async def test_each_deployment_gets_its_client_and_budgets_hold(
    redis_deployment: RedisDeployment, store: Store, redis_prefix: str
) -> None:
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    limiter = Limiter(client, prefix=redis_prefix, ledger=store, timeout_seconds=10.0)
    try:
        assert isinstance(client, RedisCluster) == (redis_deployment.kind == "cluster")
        pool = getattr(client, "connection_pool", None)
        assert isinstance(pool, SentinelConnectionPool) == (redis_deployment.kind == "sentinel")
        assert limiter.pipelined == PIPELINED[redis_deployment.kind]
        tenant, key = secrets.randbelow(10**9) + 10**6, secrets.randbelow(10**9) + 10**6
        limits = Limits(daily_tokens=10, concurrency=1)
        common = {"tenant_id": tenant, "key_id": key, "key_limits": limits}
        admitted = await limiter.admit(**common, tenant_limits=Limits(), request_id="r1")
        assert admitted.allowed and admitted.lease_id
        assert not (await limiter.admit(**common, tenant_limits=Limits(), request_id="r2")).allowed
        spent = await limiter.reserve(**common, tenant_limits=Limits(), request_id="r1", tokens=10)
        assert spent.allowed
        over = await limiter.reserve(**common, tenant_limits=Limits(), request_id="r3", tokens=1)
        assert not over.allowed and over.reason == "daily_tokens"
        await limiter.release_lease(tenant_id=tenant, key_id=key, lease_id=admitted.lease_id)
        assert await limiter.ping()
        if isinstance(client, RedisCluster):  # every key of one tenant in one slot
            names = [n async for n in client.scan_iter(match=f"{redis_prefix}:{{t{tenant}}}:*")]
            assert names and len({client.keyslot(n) for n in names}) == 1
    finally:
        await limiter.aclose()
        await close_redis(client)


@pytest.fixture(scope="module")
def tls_deployment(_started_redis_deployments: dict[str, RedisDeployment]) -> RedisDeployment:
    """The run's TLS deployment (the parametrised suites' one, if they started it)."""
    deployment = _started_redis_deployments.get("tls")
    if deployment is None:
        deployment = _started_redis_deployments["tls"] = start_deployment("tls")
    return deployment


async def test_tls_verifies_the_server_against_the_ca_file(
    tls_deployment: RedisDeployment, store: Store, redis_prefix: str
) -> None:
    assert tls_deployment.url.startswith("rediss://") and tls_deployment.ca_file
    # without the CA file the throwaway CA is not trusted: fail closed, never talk in clear
    untrusted = await open_redis(tls_deployment.url, timeout_seconds=2.0)
    limiter = Limiter(untrusted, prefix=redis_prefix, ledger=store, timeout_seconds=2.0)
    try:
        assert limiter.pipelined
        assert not await limiter.ping()
        with pytest.raises(LimiterUnavailable):
            await limiter.admit(
                tenant_id=1,
                key_id=1,
                key_limits=Limits(rpm=5),
                tenant_limits=Limits(),
                request_id="x",
            )
    finally:
        await limiter.aclose()
        await close_redis(untrusted)
    trusted = await open_redis(tls_deployment.url, ca_file=tls_deployment.ca_file)
    limiter = Limiter(trusted, prefix=redis_prefix, ledger=store, timeout_seconds=5.0)
    try:
        assert await limiter.ping()
        assert await trusted.ping()  # redis-py's own connections (key cache) too
    finally:
        await limiter.aclose()
        await close_redis(trusted)


async def test_cluster_over_tls_runs_the_limiter(store: Store, redis_prefix: str) -> None:
    deployment = start_deployment("cluster+tls")
    try:
        client = await open_redis(deployment.url, ca_file=deployment.ca_file)
        limiter = Limiter(client, prefix=redis_prefix, ledger=store, timeout_seconds=10.0)
        try:
            assert isinstance(client, RedisCluster)
            decision = await limiter.admit(
                tenant_id=7,
                key_id=7,
                key_limits=Limits(rpm=1),
                tenant_limits=Limits(),
                request_id="a",
            )
            assert decision.allowed
            second = await limiter.admit(
                tenant_id=7,
                key_id=7,
                key_limits=Limits(rpm=1),
                tenant_limits=Limits(),
                request_id="b",
            )
            assert not second.allowed and second.reason == "rpm"
        finally:
            await limiter.aclose()
            await close_redis(client)
    finally:
        deployment.destroy()
