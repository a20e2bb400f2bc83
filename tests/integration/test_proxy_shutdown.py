"""SIGTERM during a stream (real Granian, Redis, Postgres): the answer ends whole, fully accounted.

Granian never cancels a request's task: at SIGTERM it stops accepting, lets
the connections in flight end, and only then runs the lifespan shutdown (which
drains what is left of the accounting before the audit writer stops).
"""

from __future__ import annotations

import json
import signal

import httpx
from redis.asyncio import Redis

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.identity import Limits
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import SimulatorServer, running_proxy

pytest_plugins = ["tests.support.proxy_fixtures"]

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}


async def test_a_stream_in_flight_at_sigterm_ends_whole_and_is_settled_and_audited(
    sim: SimulatorServer, database_url: str, redis_test_url: str, redis_prefix: str, store: Store
) -> None:
    sim.configure(chunks=20, chunk_delay_ms=50)
    ids = new_ids()
    request_id = f"req-sigterm-{ids['key_id']}"
    limits = Limits(total_tokens=100_000)
    token = signed("chat", request_id=request_id, key_limits=limits, **ids)
    total_key = f"{redis_prefix}:{{t{ids['tenant_id']}}}:bud:k{ids['key_id']}:total"
    with running_proxy(
        database_url=database_url,
        redis_url=redis_test_url,
        redis_prefix=redis_prefix,
        ollama_url=sim.url,
    ) as proxy:
        async with (
            httpx.AsyncClient(timeout=15) as client,
            client.stream(
                "POST", f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
            ) as stream,
        ):
            lines = stream.aiter_lines()
            assert await anext(lines)
            proxy.proc.send_signal(signal.SIGTERM)
            rest = [line async for line in lines if line]
        assert json.loads(rest[-1])["done"] is True  # the whole answer, after the signal
        assert proxy.proc.wait(20) == 0
        log = proxy.log.read_text()
    assert "finishing_left" not in log
    assert "settle_given_up" not in log
    assert "audit_row_after_stop" not in log
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["status"] == 200
    redis = Redis.from_url(redis_test_url)
    try:
        charged = int(await redis.get(total_key) or 0)
    finally:
        await redis.aclose()
    assert charged == row["prompt_tokens"] + row["completion_tokens"]  # settled, not reserved
