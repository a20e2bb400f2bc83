"""OpenAI translation fidelity, through HTTP, with the official ``openai`` client.

The simulator is scripted (``/_sim/config {"script"}``) to answer as a
thinking model, with logprobs, tool-call ids or a length stop, the way
Ollama does; each test asserts both what reached the simulator and what the
client sees (and, where it bills, the audit row).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from tests.support.identity import identity_hook
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

pytest_plugins = ["tests.support.proxy_fixtures"]

USER = [{"role": "user", "content": "think about it"}]
MODEL = "llama3.2"


class _Client:
    def __init__(self, proxy: ProxyServer, **fields: Any) -> None:
        self.request_ids: list[str] = []
        hook = identity_hook(self.request_ids, **{**new_ids(), **fields})
        self.http = httpx.Client(event_hooks={"request": [hook]})
        self.openai = openai.OpenAI(
            base_url=f"{proxy.url}/v1", api_key="not-used", http_client=self.http, max_retries=0
        )


@pytest.fixture
def client(proxy: ProxyServer) -> Iterator[_Client]:
    c = _Client(proxy)
    yield c
    c.openai.close()


def _line(message: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "created_at": "2026-12-02T13:00:00Z", "done": False}
    if message is not None:
        body["message"] = {"role": "assistant", "content": "", **message}
    body.update(fields)
    return body


def _final(prompt: int, evals: int, reason: str = "stop", **message: Any) -> dict[str, Any]:
    return _line(
        message,
        done=True,
        done_reason=reason,
        prompt_eval_count=prompt,
        eval_count=evals,
    )


def _chat_request(sim: SimulatorServer) -> dict[str, Any]:
    (request,) = [r for r in sim.forwarded() if r["path"] == "/api/chat"]
    return dict(request["body"])


# ------------------------------------------------------------------ thinking


async def test_thinking_streams_as_reasoning_while_the_model_thinks_and_is_billed(
    client: _Client, sim: SimulatorServer, store: Store
) -> None:
    lines = [
        _line({"thinking": "Let me "}),
        _line({"thinking": "see."}),
        _line({"content": "Four."}),
        _final(7, 3),
    ]
    sim.configure(script=[{"lines": lines}])
    chunks = list(
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            reasoning_effort="high",
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning", "") for d in deltas)
    assert reasoning == "Let me see."
    assert "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == "Four."
    # the thinking frames come before any content, one per upstream chunk
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert [i for i, d in enumerate(deltas) if (d.model_extra or {}).get("reasoning")] == [1, 2]
    assert first_content == 3
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 3
    assert _chat_request(sim)["think"] == "high"
    row = (await wait_audit_rows(store, client.request_ids))[client.request_ids[0]]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (7, 3, False)


def test_thinking_in_a_whole_answer_and_back_in_the_history(
    client: _Client, sim: SimulatorServer
) -> None:
    sim.configure(script=[{"body": _final(5, 4, thinking="Two and two.", content="Four.")}])
    reply = client.openai.chat.completions.create(model=MODEL, messages=USER)  # type: ignore[arg-type]
    message = reply.choices[0].message
    assert message.content == "Four."
    assert (message.model_extra or {})["reasoning"] == "Two and two."
    assert (message.model_extra or {})["reasoning_content"] == "Two and two."
    assert "think" not in _chat_request(sim)  # no effort asked: the model's default

    sim.clear()
    history = [*USER, {"role": "assistant", "content": "Four.", "reasoning": "Two and two."}]
    client.openai.chat.completions.create(
        model=MODEL,
        messages=[*history, {"role": "user", "content": "sure?"}],  # type: ignore[list-item]
    )
    assert _chat_request(sim)["messages"][1] == {
        "role": "assistant",
        "content": "Four.",
        "thinking": "Two and two.",
    }


@pytest.mark.parametrize(
    ("effort", "think"),
    [("none", False), ("minimal", "low"), ("low", "low"), ("medium", "medium"), ("xhigh", "high")],
)
def test_reasoning_effort_maps_to_think(
    client: _Client, sim: SimulatorServer, effort: str, think: object
) -> None:
    client.openai.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort=effort,  # type: ignore[arg-type]
    )
    forwarded = _chat_request(sim)["think"]
    assert (forwarded, type(forwarded)) == (think, type(think))


def test_reasoning_object_and_unknown_effort(client: _Client, sim: SimulatorServer) -> None:
    client.openai.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        extra_body={"reasoning": {"effort": "none"}},
    )
    assert _chat_request(sim)["think"] is False
    sim.clear()
    with pytest.raises(openai.BadRequestError) as bad:
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            reasoning_effort="enormous",  # type: ignore[arg-type]
        )
    assert bad.value.param == "reasoning_effort"  # type: ignore[attr-defined]
    assert sim.forwarded() == []


# ------------------------------------------------------------------ logprobs

_LOGPROBS = [
    {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]},
        ],
    }
]


def test_chat_logprobs_are_forwarded_and_mapped(client: _Client, sim: SimulatorServer) -> None:
    sim.configure(
        script=[
            {"body": _final(3, 1, content="Hi") | {"logprobs": _LOGPROBS}},
            {"lines": [_line({"content": "Hi"}, logprobs=_LOGPROBS), _final(3, 1)]},
        ]
    )
    whole = client.openai.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=2,
    )
    forwarded = _chat_request(sim)
    assert (forwarded["logprobs"], forwarded["top_logprobs"]) == (True, 2)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    (token,) = logprobs.content
    assert (token.token, token.logprob, token.bytes) == ("Hi", -0.25, [72, 105])
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [("Hi", -0.25), ("Hey", -1.5)]

    streamed = list(
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            logprobs=True,
            stream=True,
        )
    )
    with_logprobs = [c for c in streamed if c.choices and c.choices[0].logprobs]
    assert len(with_logprobs) == 1
    content = with_logprobs[0].choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and content[0].token == "Hi"
    assert with_logprobs[0].choices[0].delta.content == "Hi"


def test_completion_logprobs_are_forwarded_and_mapped(
    client: _Client, sim: SimulatorServer
) -> None:
    generated = {"model": MODEL, "response": "Hi", "done": True, "done_reason": "stop"}
    sim.configure(
        script=[
            {"body": generated | {"prompt_eval_count": 2, "eval_count": 1, "logprobs": _LOGPROBS}}
        ]
    )
    completion = client.openai.completions.create(model=MODEL, prompt="say hi", logprobs=2)
    (request,) = [r for r in sim.forwarded() if r["path"] == "/api/generate"]
    assert (request["body"]["logprobs"], request["body"]["top_logprobs"]) == (True, 2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert (logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset) == (
        ["Hi"],
        [-0.25],
        [0],
    )
    assert logprobs.top_logprobs == [{"Hi": -0.25, "Hey": -1.5}]


def test_logprobs_are_not_asked_for_unless_requested(client: _Client, sim: SimulatorServer) -> None:
    reply = client.openai.chat.completions.create(model=MODEL, messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].logprobs is None
    forwarded = _chat_request(sim)
    assert "logprobs" not in forwarded and "top_logprobs" not in forwarded


# ------------------------------------------------------------------ tool calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def _tool_call(call_id: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    if call_id is not None:
        call["id"] = call_id
    return call


def test_tool_call_ids_are_kept_or_fresh_and_unique(client: _Client, sim: SimulatorServer) -> None:
    sim.configure(
        script=[
            {"body": _final(3, 1, tool_calls=[_tool_call("call_k3ep1t")])},
            {"body": _final(3, 1, tool_calls=[_tool_call()])},
            {"body": _final(3, 1, tool_calls=[_tool_call()])},
            {"lines": [_line({"tool_calls": [_tool_call("call_str3am")]}), _final(3, 1)]},
        ]
    )
    ids = []
    for _ in range(3):
        reply = client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        ids += [c.id for c in reply.choices[0].message.tool_calls or []]
    assert ids[0] == "call_k3ep1t"  # Ollama's own id
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids[1:])
    assert len(set(ids)) == 3  # never call_0 in every turn
    with client.openai.chat.completions.stream(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    assert [c.id for c in final.choices[0].message.tool_calls or []] == ["call_str3am"]


def test_tool_call_ids_and_tool_call_id_reach_ollama(client: _Client, sim: SimulatorServer) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    client.openai.chat.completions.create(
        model=MODEL,
        messages=[  # type: ignore[list-item]
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    messages = _chat_request(sim)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_abc"
    assert messages[2] == {
        "role": "tool",
        "content": "sunny",
        "tool_name": "get_weather",
        "tool_call_id": "call_abc",
    }


def test_finish_reason_is_length_when_ollama_stopped_on_length_even_with_tool_calls(
    client: _Client, sim: SimulatorServer
) -> None:
    sim.configure(
        script=[
            {"body": _final(3, 8, reason="length", tool_calls=[_tool_call("call_1")])},
            {"lines": [_line({"tool_calls": [_tool_call("call_2")]}), _final(3, 8, "length")]},
        ]
    )
    whole = client.openai.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=8,
    )
    assert whole.choices[0].finish_reason == "length"
    streamed = list(
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            max_tokens=8,
            stream=True,
        )
    )
    reasons = [c.choices[0].finish_reason for c in streamed if c.choices]
    assert reasons[-1] == "length"


def test_a_named_tool_choice_offers_only_that_tool(client: _Client, sim: SimulatorServer) -> None:
    client.openai.chat.completions.create(
        model=MODEL,
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [t["function"]["name"] for t in _chat_request(sim)["tools"]] == ["get_time"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    assert bad.value.param == "tool_choice"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_fields_that_cannot_be_honoured_are_400s_naming_them(
    client: _Client, sim: SimulatorServer, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.openai.chat.completions.create(
            model=MODEL,
            messages=USER,  # type: ignore[arg-type]
            extra_body=extra,
        )
    assert bad.value.param == param  # type: ignore[attr-defined]
    assert sim.forwarded() == []


def test_audio_input_parts_are_400s_naming_them(client: _Client, sim: SimulatorServer) -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as bad:
        client.openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [part]}],  # type: ignore[list-item]
        )
    assert bad.value.param == "messages[0].content[0].type"  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["", [], ["a", ""]])
def test_empty_embeddings_input_is_a_400(
    client: _Client, sim: SimulatorServer, value: object
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.openai.embeddings.create(model="nomic-embed-text", input=value)  # type: ignore[arg-type]
    assert bad.value.param == "input"  # type: ignore[attr-defined]
    assert sim.forwarded() == []


def test_missing_and_unpermitted_models_are_the_same_404_model_not_found(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    narrowed = _Client(proxy, models=["qwen2.5:0.5b:latest", "qwen2.5:0.5b"])
    errors = []
    try:
        for model in ("not-installed", MODEL):
            with pytest.raises(openai.NotFoundError) as missing:
                narrowed.openai.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
            errors.append(missing.value.body)
        with pytest.raises(openai.NotFoundError):
            narrowed.openai.embeddings.create(model="nomic-embed-text", input="x")
    finally:
        narrowed.openai.close()
    for body, model in zip(errors, ("not-installed", MODEL), strict=True):
        assert isinstance(body, dict)
        assert (body["code"], body["param"], body["type"]) == (
            "model_not_found",
            "model",
            "invalid_request_error",
        )
        assert body["message"] == (
            f"The model '{model}' does not exist or you do not have access to it."
        )
    assert sim.forwarded() == []
