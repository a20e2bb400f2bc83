"""redis-py clients that fail only in redis-py's error tree, and never run a command twice.

What redis-py does around a Cluster failover, seen under traffic (issue 13),
and what the subclasses here change:

- A command whose connection breaks *after it was sent* is sent again
  (``RedisCluster`` retries ``ConnectionError`` up to 10 times by default):
  a limiter script that already ran runs twice (a request counted twice, its
  single-use identity then found used: a 401 for a client that did nothing
  wrong). :class:`GuardedCluster` sends a command again only when it surely
  did not run: no connection could be made (:class:`NotSent`), or the server
  refused it unrun (``CLUSTERDOWN``, ``MASTERDOWN``, slot not covered).
- On ``CLUSTERDOWN``, on every fifth ``MOVED`` and when a slot-map refresh
  fails, redis-py closes the connections of *every* node, in use or not:
  the other callers' commands in flight break (a 503 after the cluster has
  recovered, or a command sent twice). :class:`GuardedCluster` only marks
  the slot map for a refresh before the next command; connections to nodes
  that left the map are closed by the refresh itself.
- A connection closed by one caller while another is still connecting it
  surfaces as ``AttributeError`` (``'NoneType' object has no attribute
  'writelines'``), and a slot-map refresh that fails as
  ``RedisClusterException``, neither a ``RedisError``: callers that map
  ``RedisError`` to a fail-closed 503 let them through as a 500.
  Every client here raises only ``RedisError`` (and ``TimeoutError`` /
  ``OSError``, which callers map too) from a command.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["GuardedCluster", "GuardedRedis", "NotSent", "as_redis_error"]


class NotSent(RedisConnectionError):
    """No connection could be made: the command was never sent (safe to send again)."""


def as_redis_error(exc: Exception) -> RedisError:
    """``exc`` as a ``ConnectionError`` if it is not one of redis-py's own errors."""
    if isinstance(exc, RedisError):
        return exc
    return RedisConnectionError(f"redis client failed: {type(exc).__name__}: {exc}")


class _SentOnlyWhenConnected:
    """Connection mix-in: any failure while connecting is :class:`NotSent`."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        try:
            await super().connect_check_health(  # type: ignore[misc]
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except NotSent:
            raise
        except Exception as exc:  # redis-py's errors and its races (AttributeError) alike
            raise NotSent(f"{type(exc).__name__}: {exc}") from exc


class _NotSentConnection(_SentOnlyWhenConnected, Connection):
    pass


class _NotSentSSLConnection(_SentOnlyWhenConnected, SSLConnection):
    pass


class GuardedRedis(aioredis.Redis):
    """A single server's or Sentinel master's client whose commands raise only ``RedisError``."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError):
            raise
        except Exception as exc:
            raise as_redis_error(exc) from exc


class GuardedCluster(RedisCluster):
    """A ``RedisCluster`` that retries only what never ran and never breaks others' commands.

    ``retries``: how often a command that was not sent (or refused unrun) is
    tried again, the slot map refreshed before each try. Close it with
    :meth:`close_for_good` (``close_redis`` does): :meth:`aclose` is what redis-py
    calls on its own to force a refresh, and here only marks the map stale.
    """

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        NotSent,
        ClusterDownError,
        MasterDownError,
        SlotNotCoveredError,
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shutting_down = False
        tls = self.connection_kwargs["connection_class"] is SSLConnection
        connection_class = _NotSentSSLConnection if tls else _NotSentConnection
        # the nodes manager shares this dict: nodes found later get the class too
        self.connection_kwargs["connection_class"] = connection_class
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = connection_class

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (RedisError, OSError, TimeoutError):
            raise
        except Exception as exc:  # RedisClusterException (slot map), races: not a 500
            raise as_redis_error(exc) from exc

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> GuardedCluster:
        """Refresh the slot map when it is marked stale; a failed refresh leaves it marked.

        redis-py's own closes every node's connections when a refresh fails
        (a caller's timeout cancelling it, too); the old map and its
        connections stay here, and the next command tries again.
        """
        if self._initialize:
            await self.nodes_manager.initialize(
                additional_startup_nodes_info=additional_startup_nodes_info,
                last_failed_node_name=last_failed_node_name,
            )
            default = self.nodes_manager.default_node
            if self.commands_parser.commands:  # the command table does not change
                self.commands_parser.node = default
            else:
                await self.commands_parser.initialize(default)
            self._initialize = False
        return self

    async def aclose(self) -> None:
        """Mark the slot map stale (redis-py's reaction to CLUSTERDOWN and MOVED storms)."""
        if self._shutting_down:
            await super().aclose()
            return
        self._initialize = True

    async def close_for_good(self) -> None:
        """Close every connection for good."""
        self._shutting_down = True
        self._initialize = False  # RedisCluster.aclose closes only an initialised client
        await super().aclose()
