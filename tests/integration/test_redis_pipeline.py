"""The limiter's pipelined Redis client against a real Redis (and a server that never answers)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis
from neuronetz_gateway.domain.identity import Limits
from tests.support.servers import ThrowawayRedis

pytestmark = pytest.mark.integration

SCRIPT = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
async def pipelined(redis_test_url: str) -> AsyncIterator[PipelinedRedis]:
    client = await open_redis(redis_test_url)
    wire = PipelinedRedis.for_client(client, timeout_seconds=5.0)
    assert wire is not None
    try:
        yield wire
    finally:
        await wire.aclose()
        await client.aclose()


async def test_concurrent_callers_each_get_their_own_reply(
    pipelined: PipelinedRedis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:pipe:{secrets.token_hex(4)}"
    echoes = await asyncio.gather(*(pipelined.execute("ECHO", f"m{i}") for i in range(500)))
    assert echoes == [f"m{i}".encode() for i in range(500)]
    counts = await asyncio.gather(*(pipelined.execute("INCR", key) for _ in range(300)))
    assert sorted(counts) == list(range(1, 301))
    assert await pipelined.execute("GET", key) == b"300"
    await pipelined.execute("DEL", key)


async def test_an_error_reply_raises_and_the_stream_stays_in_step(
    pipelined: PipelinedRedis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:pipe:{secrets.token_hex(4)}"
    await pipelined.execute("SET", key, "text")
    results = await asyncio.gather(
        pipelined.execute("ECHO", "before"),
        pipelined.execute("INCR", key),  # not an integer: an error reply
        pipelined.execute("ECHO", "after"),
        return_exceptions=True,
    )
    assert results[0] == b"before"
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"after"
    await pipelined.execute("DEL", key)


async def test_a_caller_that_gives_up_does_not_shift_the_replies(
    pipelined: PipelinedRedis, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:pipe:{secrets.token_hex(4)}"

    async def impatient() -> None:
        async with asyncio.timeout(0.05):
            await pipelined.execute("BLPOP", key, 0.3)  # Redis holds the connection 0.3 s

    slow = asyncio.ensure_future(impatient())
    await asyncio.sleep(0.01)  # the BLPOP is on the wire first
    queued = asyncio.ensure_future(pipelined.execute("ECHO", "mine"))
    with pytest.raises(TimeoutError):
        await slow
    # the BLPOP's nil reply arrives first and is dropped; the ECHO gets its own
    assert await queued == b"mine"
    assert await pipelined.execute("ECHO", "next") == b"next"


async def test_every_command_is_bounded_by_the_timeout(redis_test_url: str) -> None:
    client = await open_redis(redis_test_url)
    wire = PipelinedRedis.for_client(client, timeout_seconds=0.3)
    assert wire is not None
    try:
        started = time.monotonic()
        with pytest.raises((TimeoutError, RedisConnectionError)):
            await wire.execute("BLPOP", f"nz-test-empty-{secrets.token_hex(4)}", 2)
        assert time.monotonic() - started < 1.0
        assert await wire.execute("ECHO", "still") == b"still"
    finally:
        await wire.aclose()
        await client.aclose()


async def test_evalsha_loads_a_script_redis_does_not_have(
    pipelined: PipelinedRedis, redis_prefix: str
) -> None:
    import hashlib

    script = f"{SCRIPT} -- {secrets.token_hex(8)}"  # surely not loaded yet
    sha = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis's script id
    assert await pipelined.execute("SCRIPT", "EXISTS", sha) == [0]
    assert await pipelined.evalsha(sha, script, ["k"], ["v"]) == [b"k", b"v"]
    assert await pipelined.execute("SCRIPT", "EXISTS", sha) == [1]
    assert await pipelined.evalsha(sha, script, ["k2"], [7]) == [b"k2", b"7"]


async def test_auth_and_database_are_selected_on_connect() -> None:
    server = ThrowawayRedis()
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.config_set("requirepass", "s3cret")
        client = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        wire = PipelinedRedis.for_client(client, timeout_seconds=2.0)
        assert wire is not None
        await wire.execute("SET", "where", "db2")
        assert await client.get("where") == b"db2"
        await wire.aclose()
        wrong = PipelinedRedis(port=server.port, password="wrong", timeout_seconds=2.0)
        with pytest.raises(ResponseError):
            await wrong.execute("PING")
        await wrong.aclose()
        await client.aclose()
    finally:
        await admin.aclose()
        server.destroy()


async def _eventually(check: Callable[[], bool], within: float = 0.5) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_silent_server_fails_every_waiter_within_the_timeout_then_reconnects() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = PipelinedRedis(port=port, timeout_seconds=0.3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(wire.execute("PING") for _ in range(20)), return_exceptions=True
        )
        assert time.monotonic() - started < 1.0
        # a waiter whose own deadline comes before the silence check gets TimeoutError;
        # the limiter answers both the same way (LimiterUnavailable, 503)
        assert all(isinstance(r, RedisConnectionError | TimeoutError) for r in results)
        assert len(hung) == 1  # one connection for all of them
        # The silent connection is dropped by the first check that finds Redis
        # owing replies past the timeout: this call, or (under load) the next.
        for _ in range(2):
            with pytest.raises((RedisConnectionError, TimeoutError)):
                await wire.execute("PING")
            if await _eventually(lambda: len(hung) == 2):
                break
        assert len(hung) == 2  # the dropped connection was replaced
    finally:
        await wire.aclose()
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_client_refuses_commands(redis_test_url: str) -> None:
    client = await open_redis(redis_test_url)
    wire = PipelinedRedis.for_client(client, timeout_seconds=1.0)
    assert wire is not None
    assert await wire.execute("PING") == b"PONG"
    await wire.aclose()
    await wire.aclose()  # idempotent
    with pytest.raises(RedisConnectionError, match="closed"):
        await wire.execute("PING")
    await client.aclose()


def test_tcp_tls_and_unix_are_spoken_the_rest_left_to_redis_py() -> None:
    tls = PipelinedRedis.for_client(aioredis.Redis.from_url("rediss://127.0.0.1:1/0"), 1.0)
    assert tls is not None and tls.tls
    plain = PipelinedRedis.for_client(aioredis.Redis.from_url("redis://127.0.0.1:1/0"), 1.0)
    assert plain is not None and not plain.tls
    unix = PipelinedRedis.for_client(aioredis.Redis.from_url("unix:///tmp/nz.sock?db=3"), 1.0)
    assert unix is not None


class _CustomConnection(Connection):
    """Some set-up the pipelined client does not know (as TLS or Sentinel would be)."""


async def test_the_limiter_falls_back_to_redis_py(
    redis_test_url: str, redis_prefix: str, store: Store
) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_test_url, connection_class=_CustomConnection)
    client = aioredis.Redis(connection_pool=pool)
    limiter = Limiter(client, prefix=redis_prefix, ledger=store, timeout_seconds=5.0)
    assert not limiter.pipelined
    tenant, key = 1_000_000 + secrets.randbelow(2_000_000_000), 7
    limits = Limits(rpm=2, concurrency=5, daily_tokens=100)
    try:
        first = await limiter.admit(
            tenant_id=tenant, key_id=key, key_limits=limits, tenant_limits=Limits(), request_id="a"
        )
        assert first.allowed
        assert first.lease_id is not None
        assert (
            await limiter.reserve(
                tenant_id=tenant,
                key_id=key,
                key_limits=limits,
                tenant_limits=Limits(),
                request_id="a",
                tokens=60,
            )
        ).allowed
        allowance = await limiter.settle(
            tenant_id=tenant,
            key_id=key,
            reserved=60,
            actual=10,
            reserved_at=time.time(),
            key_limits=limits,
            release_lease_id=first.lease_id,
        )
        assert allowance.remaining_daily_tokens == 90
        assert await limiter.ping()
    finally:
        await limiter.aclose()
        await client.aclose(close_connection_pool=True)


async def test_the_limiter_maps_a_refused_auth_to_unavailable(store: Store) -> None:
    server = ThrowawayRedis()
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.config_set("requirepass", "s3cret")
        client = aioredis.Redis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0")
        limiter = Limiter(client, prefix="nz", ledger=store)
        assert limiter.pipelined
        with pytest.raises(LimiterUnavailable):
            await limiter.release_lease(tenant_id=1, key_id=1, lease_id="x")
        assert not await limiter.ping()
        await limiter.aclose()
        await client.aclose()
    finally:
        await admin.aclose()
        server.destroy()
