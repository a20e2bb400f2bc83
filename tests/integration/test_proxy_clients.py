"""The official ``ollama`` and ``openai`` Python clients work through the proxy.

Usage in every response equals what the simulator counted, and the audit
row charges the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.simulator import PROMPT_OVERHEAD, simulated_text
from tests.support.identity import identity_hook
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

PROMPT = "why is the sky blue"  # 5 words
PROMPT_TOKENS = 5 + PROMPT_OVERHEAD
CHUNKS = 20

pytest_plugins = ["tests.support.proxy_fixtures"]


class _Recorder:
    """Signs each request for its route and remembers the request ids it sent."""

    def __init__(self) -> None:
        self.ids = new_ids()
        self.request_ids: list[str] = []
        self.hook = identity_hook(self.request_ids, **self.ids)


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def ollama_client(proxy: ProxyServer, recorder: _Recorder) -> Iterator[ollama.Client]:
    client = ollama.Client(host=proxy.url, event_hooks={"request": [recorder.hook]})
    yield client
    client._client.close()


@pytest.fixture
def openai_client(proxy: ProxyServer, recorder: _Recorder) -> Iterator[openai.OpenAI]:
    http = httpx.Client(event_hooks={"request": [recorder.hook]})
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="not-used", http_client=http)
    yield client
    client.close()


async def _audit(store: Store, recorder: _Recorder) -> list[dict[str, object]]:
    rows = await wait_audit_rows(store, recorder.request_ids)
    return [rows[r] for r in recorder.request_ids]


async def test_ollama_client_chat_and_generate(
    ollama_client: ollama.Client, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    reply = ollama_client.chat(model="llama3.2", messages=messages)
    assert reply.message.content == simulated_text(CHUNKS)
    assert (reply.prompt_eval_count, reply.eval_count) == (PROMPT_TOKENS, CHUNKS)

    parts = list(ollama_client.chat(model="llama3.2", messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == simulated_text(CHUNKS)
    assert (parts[-1].prompt_eval_count, parts[-1].eval_count) == (PROMPT_TOKENS, CHUNKS)

    generated = ollama_client.generate(model="llama3.2", prompt=PROMPT)
    assert generated.response == simulated_text(CHUNKS)
    assert (generated.prompt_eval_count, generated.eval_count) == (PROMPT_TOKENS, CHUNKS)

    streamed = list(ollama_client.generate(model="llama3.2", prompt=PROMPT, stream=True))
    assert "".join(p.response for p in streamed) == simulated_text(CHUNKS)
    assert streamed[-1].eval_count == CHUNKS

    rows = await _audit(store, recorder)
    assert [r["route"] for r in rows] == ["chat", "chat", "generate", "generate"]
    assert [r["streamed"] for r in rows] == [False, True, False, True]
    for row in rows:
        assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_TOKENS, CHUNKS)
        assert row["status"] == 200
        assert row["model"] == "llama3.2:latest"
        assert row["estimated"] is False


async def test_ollama_client_embed_list_show(
    ollama_client: ollama.Client, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    embedded = ollama_client.embed(model="nomic-embed-text", input=["one two", "three"])
    assert len(embedded.embeddings) == 2
    assert embedded.prompt_eval_count == (2 + 1) + (1 + 1)

    listed = ollama_client.list()
    assert {m.model for m in listed.models} == {
        "llama3.2:latest",
        "qwen2.5:0.5b",
        "nomic-embed-text:latest",
    }
    shown = ollama_client.show("llama3.2")
    assert shown.capabilities == ["completion", "tools"]

    rows = await _audit(store, recorder)
    assert [r["route"] for r in rows] == ["embed", "tags", "show"]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (5, 0)


async def test_openai_client_chat_streaming_with_and_without_usage(
    openai_client: openai.OpenAI, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(
        openai_client.chat.completions.create(
            model="llama3.2",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == simulated_text(CHUNKS)
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, CHUNKS)

    plain = list(
        openai_client.chat.completions.create(
            model="llama3.2",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
        )
    )
    assert all(c.usage is None for c in plain)
    assert plain[-1].choices[0].finish_reason == "stop"

    whole = openai_client.chat.completions.create(model="llama3.2", messages=messages)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == simulated_text(CHUNKS)
    assert whole.usage is not None
    assert whole.usage.total_tokens == PROMPT_TOKENS + CHUNKS

    rows = await _audit(store, recorder)
    for row in rows:
        assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_TOKENS, CHUNKS)
        assert row["route"] == "v1.chat.completions"
    assert [r["streamed"] for r in rows] == [True, True, False]


async def test_openai_client_completions_embeddings_models(
    openai_client: openai.OpenAI, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    completion = openai_client.completions.create(model="llama3.2", prompt=PROMPT, max_tokens=7)
    assert completion.choices[0].text == simulated_text(7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        7,
    )

    embedding = openai_client.embeddings.create(model="nomic-embed-text", input="one two three")
    assert len(embedding.data[0].embedding) == 8
    assert embedding.usage.prompt_tokens == 3 + 1

    ids = {m.id for m in openai_client.models.list()}
    assert ids == {"llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"}
    assert openai_client.models.retrieve("llama3.2:latest").id == "llama3.2:latest"

    rows = await _audit(store, recorder)
    assert [r["route"] for r in rows] == [
        "v1.completions",
        "v1.embeddings",
        "v1.models",
        "v1.model",
    ]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (PROMPT_TOKENS, 7)
    assert (rows[1]["prompt_tokens"], rows[1]["completion_tokens"]) == (4, 0)
    # the simulator saw max_tokens as num_predict on /api/generate
    (generate,) = [r for r in sim.forwarded() if r["path"] == "/api/generate"]
    assert generate["body"]["options"]["num_predict"] == 7


def test_openai_errors_reach_the_client_typed(
    openai_client: openai.OpenAI, sim: SimulatorServer
) -> None:
    # OpenAI's 404 model_not_found (issue 9), not a 403 the SDK reads as a permission problem
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="not-installed", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("not-installed")
    sim.configure(failure="busy")
    with pytest.raises(openai.InternalServerError) as busy:
        openai_client.with_options(max_retries=0).chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "x"}]
        )
    assert busy.value.status_code == 503


async def test_legacy_embeddings_route_is_charged_by_estimate(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    request_ids: list[str] = []
    hook = identity_hook(request_ids, **new_ids())
    async with httpx.AsyncClient(event_hooks={"request": [lambda r: _run(hook, r)]}) as client:
        reply = await client.post(
            f"{proxy.url}/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a b c"}
        )
    assert reply.status_code == 200
    assert len(reply.json()["embedding"]) == 8
    row = (await wait_audit_rows(store, request_ids))[request_ids[0]]
    assert row["route"] == "embeddings"
    assert row["estimated"] is True  # Ollama reports no count on this route
    assert row["prompt_tokens"] > 0
    assert row["completion_tokens"] == 0


async def _run(hook: object, request: httpx.Request) -> None:
    hook(request)  # type: ignore[operator]
