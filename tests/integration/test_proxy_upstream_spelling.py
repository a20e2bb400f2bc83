"""An upstream that writes valid JSON in another spelling is accounted exactly.

Python-based Ollama-compatible servers write ``{"done": true}`` (with a
space); Go's decoder, which Ollama's own clients use, also reads keys in any
case. The simulator is scripted to answer so (``/_sim/config {"script"}``),
and the lines arrive cut at odd places: the stream must finish cleanly (no
extra error line), be billed from the upstream's counts, and the official
clients must read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import ollama
import openai
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from tests.support.identity import IDENTITY_HEADER, identity_hook, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

pytest_plugins = ["tests.support.proxy_fixtures"]

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello"}]}


def _client(hook: Callable[[httpx.Request], None]) -> httpx.AsyncClient:
    async def signing(request: httpx.Request) -> None:
        hook(request)

    return httpx.AsyncClient(event_hooks={"request": [signing]}, timeout=10)


def _spaced(value: dict[str, Any]) -> str:
    """Python's ``json.dumps`` default spelling: ``{"done": true, ...}``."""
    return json.dumps(value)


def _chat_lines(words: list[str], prompt: int, evals: int) -> list[str]:
    lines = [
        _spaced(
            {"model": "llama3.2", "message": {"role": "assistant", "content": w}, "done": False}
        )
        for w in words
    ]
    final = {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": ""},
        "done_reason": "stop",
        "done": True,
        "prompt_eval_count": prompt,
        "eval_count": evals,
    }
    return [*lines, _spaced(final)]


@pytest.mark.parametrize("split", [0, 1, 7])
async def test_native_stream_with_spaced_json_finishes_and_is_billed_exactly(
    proxy: ProxyServer, sim: SimulatorServer, store: Store, split: int
) -> None:
    lines = _chat_lines(["Hel", "lo", " there"], prompt=11, evals=3)
    sim.configure(script=[{"lines": lines, "split": split}])
    request_ids: list[str] = []
    hook = identity_hook(request_ids, **new_ids())
    async with _client(hook) as client:
        reply = await client.post(f"{proxy.url}/api/chat", json={**CHAT, "stream": True})
    assert reply.status_code == 200
    # byte for byte what the upstream wrote: nothing appended
    assert reply.content == "".join(line + "\n" for line in lines).encode()
    row = (await wait_audit_rows(store, request_ids))[request_ids[0]]
    assert (row["status"], row["estimated"]) == (200, False)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 3)


async def test_native_stream_in_other_key_case_is_billed_from_its_counts(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    lines = [
        _spaced({"Model": "llama3.2", "Message": {"Role": "assistant", "Content": "x"}}),
        _spaced({"Model": "llama3.2", "Done": True, "Prompt_Eval_Count": 4, "Eval_Count": 1}),
    ]
    sim.configure(script=[{"lines": lines}])
    request_ids: list[str] = []
    hook = identity_hook(request_ids, **new_ids())
    async with _client(hook) as client:
        reply = await client.post(f"{proxy.url}/api/chat", json={**CHAT, "stream": True})
    assert reply.content == "".join(line + "\n" for line in lines).encode()
    row = (await wait_audit_rows(store, request_ids))[request_ids[0]]
    assert (row["status"], row["estimated"]) == (200, False)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 1)


async def test_native_non_streamed_body_in_other_spelling_is_billed_from_its_counts(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    body = {"model": "llama3.2", "response": "hi", "Done": True, "Prompt_Eval_Count": 6}
    sim.configure(script=[{"body": _spaced({**body, "EVAL_COUNT": 2})}])
    request_ids: list[str] = []
    hook = identity_hook(request_ids, **new_ids())
    async with _client(hook) as client:
        reply = await client.post(
            f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
        )
    assert reply.status_code == 200
    row = (await wait_audit_rows(store, request_ids))[request_ids[0]]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (6, 2, False)


def test_ollama_client_reads_a_spaced_stream_through_the_proxy(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.configure(script=[{"lines": _chat_lines(["a", "b"], prompt=5, evals=2), "split": 5}])
    client = ollama.Client(host=proxy.url, event_hooks={"request": [identity_hook(**new_ids())]})
    try:
        parts = list(client.chat(model="llama3.2", messages=CHAT["messages"], stream=True))
    finally:
        client._client.close()
    assert "".join(p.message.content or "" for p in parts) == "ab"
    assert (parts[-1].done, parts[-1].prompt_eval_count, parts[-1].eval_count) == (True, 5, 2)


async def test_openai_stream_from_a_spaced_upstream_ends_with_usage(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    sim.configure(script=[{"lines": _chat_lines(["a", "b"], prompt=9, evals=2), "split": 3}])
    request_ids: list[str] = []
    hook = identity_hook(request_ids, **new_ids())
    http = httpx.Client(event_hooks={"request": [hook]})
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="not-used", http_client=http)
    try:
        chunks = list(
            client.chat.completions.create(
                model="llama3.2",
                messages=CHAT["messages"],  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    finally:
        client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 2)
    row = (await wait_audit_rows(store, request_ids))[request_ids[0]]
    assert (row["status"], row["estimated"]) == (200, False)


def test_scripted_reply_is_used_once_then_the_simulator_answers_again(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.configure(script=[{"lines": _chat_lines(["only"], prompt=1, evals=1)}])
    headers = {IDENTITY_HEADER: signed("chat", **new_ids())}
    first = httpx.post(f"{proxy.url}/api/chat", json=CHAT, headers=headers, timeout=10)
    headers = {IDENTITY_HEADER: signed("chat", **new_ids())}
    second = httpx.post(f"{proxy.url}/api/chat", json=CHAT, headers=headers, timeout=10)
    assert b'"only"' in first.content
    assert b'"only"' not in second.content
    assert second.content.count(b"\n") == 21  # the simulator's own 20 chunks and final
