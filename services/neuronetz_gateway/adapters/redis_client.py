"""One way to open Redis for every deployment the gateway runs on.

``NZ_REDIS_URL`` forms::

    redis://[user:password@]host:port/db         one server, or any node of a Cluster
    rediss://[user:password@]host:port/db        the same over TLS
    unix:///path/to/redis.sock?db=0              one server on a Unix socket
    redis+sentinel://[user:password@]h1:p1,h2:p2/<master>/<db>
    rediss+sentinel://...                        Sentinel, sentinels and master over TLS

A Cluster is detected at start (``INFO cluster`` on the named node says
``cluster_enabled:1``); the client then follows the slot map itself. TLS
verifies the server against ``NZ_REDIS_CA_FILE`` when set (else the system
CAs). Every client has short timeouts and no retry loops: a failing Redis
fails the caller fast, and the caller answers 503. The one exception: a
Cluster command that surely did not run (no connection to its node, or
refused unrun while the slot map changes) is tried again on the refreshed
map, at most :data:`CLUSTER_RETRIES` times, within the caller's timeout.
The clients are :mod:`~neuronetz_gateway.adapters.redis_guard`'s: their
commands fail only with ``RedisError`` (or ``TimeoutError`` / ``OSError``).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.redis_guard import GuardedCluster, GuardedRedis
from neuronetz_gateway.domain.redis_urls import (
    SENTINEL_SCHEMES,
    SentinelTarget,
    parse_sentinel_url,
)

__all__ = ["CLUSTER_RETRIES", "RedisClient", "close_redis", "open_redis"]

log = logging.getLogger(__name__)

#: A Cluster command not sent (its node unreachable, the slot map stale) is tried this
#: many more times, the map refreshed before each: after a failover each process's
#: first command finds the old master gone and the second one the new master.
CLUSTER_RETRIES = 2

#: Either client speaks the commands the gateway sends (scripts by key, GET/SET, pipelines).
RedisClient = aioredis.Redis | RedisCluster


def _tls_kwargs(tls: bool, ca_file: str | None) -> dict[str, Any]:
    if not tls:
        return {}
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if ca_file:
        kwargs["ssl_ca_certs"] = ca_file
    return kwargs


async def _is_cluster(url: str, timeout_seconds: float, tls: dict[str, Any]) -> bool:
    """Whether the node ``url`` names runs in cluster mode; ``False`` when it cannot be asked."""
    probe: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        **tls,
    )
    try:
        info = await probe.info("cluster")
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "redis_mode_unknown",
            extra={"error": f"{type(exc).__name__}: {exc}", "assumed": "single server"},
        )
        return False
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def open_redis(
    url: str,
    *,
    timeout_seconds: float = 1.0,
    ca_file: str | None = None,
    max_connections: int | None = None,
) -> RedisClient:
    """A client for the deployment ``url`` names (see the module doc).

    ``max_connections``: for a single server, a blocking pool of that size
    (callers queue for a connection within the timeout instead of failing
    when all are busy). redis-py's Cluster and Sentinel pools do not block
    (a full pool fails at once), so they are left unbounded.
    """
    common: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        return _open_sentinel(parse_sentinel_url(url), common, ca_file)
    tls = _tls_kwargs(scheme == "rediss", ca_file)
    if scheme != "unix" and await _is_cluster(url, timeout_seconds, tls):
        cluster = GuardedCluster.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=30,
            retry=Retry(NoBackoff(), CLUSTER_RETRIES),
            **tls,
        )
        await cluster.initialize()
        return cluster
    if max_connections is not None:
        pool: aioredis.BlockingConnectionPool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=30,
            **tls,
        )
        client: aioredis.Redis = GuardedRedis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        return client
    single: aioredis.Redis = GuardedRedis.from_url(url, **common, **tls)
    return single


async def close_redis(client: RedisClient) -> None:
    """Close a client :func:`open_redis` made, its connection pool included."""
    if isinstance(client, GuardedCluster):
        await client.close_for_good()
        return
    if isinstance(client, RedisCluster):
        await client.aclose()
        return
    pool = client.connection_pool
    await client.aclose(close_connection_pool=True)
    if isinstance(pool, SentinelConnectionPool):  # the sentinels' own clients too
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose(close_connection_pool=True)


def _open_sentinel(
    target: SentinelTarget, common: dict[str, Any], ca_file: str | None
) -> aioredis.Redis:
    tls = _tls_kwargs(target.tls, ca_file)
    if target.tls:
        tls["ssl"] = True
    credentials = {"username": target.username, "password": target.password}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": common["socket_timeout"],
            "socket_connect_timeout": common["socket_connect_timeout"],
            "retry": common["retry"],  # one sentinel silent: discover_master asks the next
            **credentials,
            **tls,
        },
        **common,
        **credentials,
        **tls,
    )
    master: aioredis.Redis = sentinel.master_for(
        target.master, redis_class=GuardedRedis, db=target.db
    )
    return master
