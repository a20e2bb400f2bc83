"""A Redis Cluster client that never runs a limiter script twice and fails only as a 503.

redis-py's ``RedisCluster`` reacts to ``CLUSTERDOWN`` (and to every fifth
``MOVED``) by closing every node's connections, the other callers' commands
in flight included, and then sends a broken command again. Around a failover
that ran limiter scripts twice (a fresh request's single-use identity found
used: a 401) and let ``AttributeError`` out of a connection closed while it
was being opened (a 500 in the proxy). These tests trigger that reaction
directly, on a real Cluster, while decisions are in flight.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.devstack.servers import free_port
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.limits import Decision
from tests.support.redis_deployments import RedisDeployment, start_deployment

pytestmark = pytest.mark.integration

CALLERS = 48


@pytest.fixture(scope="module")
def cluster(_started_redis_deployments: dict[str, RedisDeployment]) -> RedisDeployment:
    deployment = _started_redis_deployments.get("cluster")
    if deployment is None:
        deployment = _started_redis_deployments["cluster"] = start_deployment("cluster")
    return deployment


async def _reserve_while_refreshed(client: RedisClient, limiter: Limiter) -> list[object]:
    """``CALLERS`` reservations with single-use identities; the client told to refresh its
    slot map (redis-py's own reaction to CLUSTERDOWN) while they are in flight."""
    tenant = secrets.randbelow(10**9) + 10**6
    until_ms = int(time.time() * 1000) + 60_000

    async def reserve(i: int) -> Decision:
        return await limiter.reserve(
            tenant_id=tenant,
            key_id=1,
            key_limits=Limits(),
            tenant_limits=Limits(daily_tokens=10**9),
            request_id=f"req-{i}",
            tokens=5,
            single_use_until_ms=until_ms,
        )

    calls = [asyncio.ensure_future(reserve(i)) for i in range(CALLERS)]
    for _ in range(6):  # some callers connecting, some sent and waiting for the reply
        await asyncio.sleep(0.002)
        await client.aclose()  # type: ignore[union-attr]
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_a_refresh_breaks_no_decision_in_flight(
    cluster: RedisDeployment, store: Store, redis_prefix: str
) -> None:
    for _ in range(3):  # cold connections the first time, warm ones after
        client = await open_redis(cluster.url, timeout_seconds=5.0)
        limiter = Limiter(client, prefix=redis_prefix, ledger=store, timeout_seconds=5.0)
        try:
            outcomes = await _reserve_while_refreshed(client, limiter)
        finally:
            await limiter.aclose()
            await close_redis(client)
        # each identity was claimed once, by its own reservation: no script ran twice
        # (IdentityReplayed), none broke (LimiterUnavailable), nothing else escaped
        failures = [repr(o) for o in outcomes if not isinstance(o, Decision)]
        assert failures == []
        assert all(isinstance(o, Decision) and o.allowed for o in outcomes)


async def test_every_cluster_failure_is_a_redis_error(cluster: RedisDeployment) -> None:
    """A slot map that cannot be refreshed (every node unreachable) fails as ``RedisError``,
    which every caller maps to its 503, not as redis-py's ``RedisClusterException``."""
    client = await open_redis(cluster.url, timeout_seconds=1.0)
    try:
        nodes = client.nodes_manager  # type: ignore[union-attr]
        dead = ClusterNode("127.0.0.1", free_port(), **nodes.connection_kwargs)
        reachable, nodes.startup_nodes = nodes.startup_nodes, {dead.name: dead}
        await client.aclose()  # type: ignore[union-attr]  # the slot map is stale now
        try:  # the only node a refresh may ask is gone
            with pytest.raises(RedisError):
                await client.execute_command("GET", f"{{t{secrets.randbelow(10**6)}}}:x")
        finally:
            nodes.startup_nodes = reachable
            await dead.disconnect()
    finally:
        await close_redis(client)
