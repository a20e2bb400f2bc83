"""The command channel the hot paths (limiter, key cache) talk to Redis through.

:func:`command_channel` gives the pipelined client
(:class:`~neuronetz_gateway.adapters.redis_pipeline.PipelinedRedis`, one
connection, every caller's commands in one write) when it can speak to the
server a redis-py client is configured for (one server over TCP, TLS or a
Unix socket), else :class:`BoundedRedisPy`: redis-py itself (it follows a
Cluster's slot map and Sentinel's master), with at most ``max_in_flight``
commands at a time per channel. redis-py's Cluster and Sentinel pools do not
block when full: a burst of 200 callers would open 200 connections (a TLS
handshake each) and past the pool's 100 fail with ``MaxConnectionsError``;
bounded, the burst queues for a few warm connections instead, each wait
within the caller's own timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from neuronetz_gateway.adapters.redis_client import RedisClient
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis, RedisArg

__all__ = ["BoundedRedisPy", "RedisCommands", "command_channel"]

#: Enough to keep a Redis busy from one process; far below redis-py's pool of 100.
DEFAULT_MAX_IN_FLIGHT = 32


class RedisCommands(Protocol):
    """Any command, and scripts by SHA (``EVAL`` when Redis lacks the script)."""

    async def execute(self, *args: RedisArg) -> Any: ...

    async def evalsha(
        self, sha: str, script: str, keys: Sequence[RedisArg], args: Sequence[RedisArg]
    ) -> Any: ...

    async def aclose(self) -> None: ...


class BoundedRedisPy:
    """Commands through a redis-py client, at most ``max_in_flight`` at once.

    For the set-ups the pipelined client does not speak: a Cluster (redis-py
    routes each script by its keys' slot, following MOVED/ASK) and Sentinel
    (it asks the sentinels for the master).
    """

    def __init__(self, client: RedisClient, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_in_flight <= 0:
            raise ValueError("max_in_flight must be positive")
        self._client = client
        self._slots = asyncio.Semaphore(max_in_flight)

    async def execute(self, *args: RedisArg) -> Any:
        async with self._slots:
            return await self._client.execute_command(*args)

    async def evalsha(
        self, sha: str, script: str, keys: Sequence[RedisArg], args: Sequence[RedisArg]
    ) -> Any:
        async with self._slots:
            run = self._client.execute_command
            try:
                return await run("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                return await run("EVAL", script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """The client belongs to the caller."""


def command_channel(client: RedisClient, timeout_seconds: float) -> RedisCommands:
    """The pipelined client to ``client``'s server when it can speak it, else bounded redis-py."""
    pipelined = PipelinedRedis.for_client(client, timeout_seconds)
    if pipelined is not None:
        return pipelined
    return BoundedRedisPy(client)
