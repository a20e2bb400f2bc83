"""Through real Caddy with the real client libraries: openai, ollama, and raw streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import ollama
import pytest
from openai import OpenAI

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_configure

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def slow_simulator(e2e_stack: E2EStack) -> Iterator[tuple[int, float]]:
    """The simulator emits ``chunks`` chunks, ``delay`` seconds apart, for one test."""
    chunks, delay_ms = 8, 150.0
    sim_configure(e2e_stack, chunks=chunks, chunk_delay_ms=delay_ms)
    try:
        yield chunks, delay_ms / 1000
    finally:
        sim_configure(e2e_stack, chunks=20, chunk_delay_ms=0.0)


async def test_openai_client_works_through_caddy(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue()
    client = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=caller.key, max_retries=0)
    try:
        reply = client.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0
        models = {m.id for m in client.models.list()}
        assert "llama3.2" in {m.split(":")[0] for m in models}
        stream = client.chat.completions.create(
            model="llama3.2",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == reply.choices[0].message.content
    finally:
        client.close()
    totals = await ledger.wait_for_requests(caller.tenant, 3)
    assert totals.requests == 3
    assert totals.completion_tokens > 0


async def test_ollama_client_works_through_caddy(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue()
    with ollama.Client(
        host=e2e_stack.url, headers={"Authorization": f"Bearer {caller.key}"}
    ) as client:
        reply = client.chat(model="llama3.2", messages=MESSAGES)
        assert reply.message.content
        assert reply.eval_count
        stream = client.chat(model="llama3.2", messages=MESSAGES, stream=True)
        pieces = [part.message.content or "" for part in stream]
        assert len(pieces) > 1
        assert "".join(pieces) == reply.message.content
        assert any(m.model and m.model.startswith("llama3.2") for m in client.list().models)
    with (
        ollama.Client(host=e2e_stack.url) as anonymous,
        pytest.raises(ollama.ResponseError) as refused,
    ):
        anonymous.chat(model="llama3.2", messages=MESSAGES)
    assert refused.value.status_code == 401


async def test_native_stream_arrives_chunk_by_chunk(
    e2e_stack: E2EStack, ledger: Ledger, slow_simulator: tuple[int, float]
) -> None:
    chunks, delay = slow_simulator
    caller = await ledger.issue()
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=e2e_stack.url, timeout=30) as client,
        client.stream(
            "POST",
            "/api/chat",
            headers={"Authorization": f"Bearer {caller.key}"},
            json={"model": "llama3.2", "messages": MESSAGES},
        ) as response,
    ):
        assert response.status_code == 200
        start = time.monotonic()
        async for line in response.aiter_lines():
            if line.strip():
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= chunks
    # Buffering anywhere (Caddy, proxy) would deliver everything at the end.
    assert arrivals[-1] - arrivals[0] >= (chunks - 2) * delay
    assert arrivals[0] < arrivals[-1] / 2


async def test_openai_sse_stream_arrives_chunk_by_chunk(
    e2e_stack: E2EStack, ledger: Ledger, slow_simulator: tuple[int, float]
) -> None:
    chunks, delay = slow_simulator
    caller = await ledger.issue()
    client = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=caller.key, max_retries=0)
    arrivals: list[float] = []
    try:
        start = time.monotonic()
        stream = client.chat.completions.create(
            model="llama3.2",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - start)
    finally:
        client.close()
    assert len(arrivals) >= chunks - 1
    assert arrivals[-1] - arrivals[0] >= (chunks - 3) * delay
