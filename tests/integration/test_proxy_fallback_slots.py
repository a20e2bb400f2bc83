"""``NZ_OLLAMA_URL`` as the one backend (none defined) with ``NZ_OLLAMA_SLOTS`` set: its slots
are admitted as a fleet backend's (Redis leases, the fair queue, keep-alives while queued).

Unset, the fallback has no slot admission (Ollama queues by itself): every other proxy
integration test runs that way. A real proxy (Granian), Redis, Postgres and the simulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import eventually
from tests.support.proxy_stack import (
    ProxyServer,
    SimulatorServer,
    running_proxy,
    running_simulator,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "tell me a story"}]}


@pytest.fixture(scope="module")
def slotted(
    database_url: str, redis_test_url: str, redis_prefix: str
) -> Iterator[tuple[SimulatorServer, ProxyServer]]:
    with (
        running_simulator() as sim,
        running_proxy(
            database_url=database_url,
            redis_url=redis_test_url,
            redis_prefix=f"{redis_prefix}fallback",
            ollama_url=sim.url,
            NZ_OLLAMA_SLOTS="1",
            NZ_QUEUE_PING_SECONDS="0.2",
        ) as proxy,
    ):
        yield sim, proxy


async def test_the_fallback_admits_its_slots_and_a_queued_stream_gets_keepalives(
    slotted: tuple[SimulatorServer, ProxyServer],
) -> None:
    sim, proxy = slotted
    sim.configure(chunks=10, chunk_delay_ms=150)  # 1.5 s a request
    async with httpx.AsyncClient(timeout=30) as client:

        async def native() -> httpx.Response:
            headers = {IDENTITY_HEADER: signed("chat")}
            return await client.post(f"{proxy.url}/api/chat", json=CHAT, headers=headers)

        first = asyncio.ensure_future(native())
        assert await eventually(lambda: sim.stats()["active"] == 1, within=10)
        headers = {IDENTITY_HEADER: signed("v1.chat.completions")}
        body = {**CHAT, "stream": True}
        async with client.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json=body, headers=headers
        ) as reply:
            assert reply.status_code == 200
            streamed = b"".join([part async for part in reply.aiter_bytes()])
        held = await first
    assert held.status_code == 200
    assert streamed.startswith(b": ping\n\n")  # it waited for the one slot
    assert streamed.rstrip().endswith(b"data: [DONE]")
    assert sim.stats()["peak_active"] == 1  # one slot: never two at once
