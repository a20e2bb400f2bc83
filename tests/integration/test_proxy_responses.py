"""The official ``openai`` client's Responses API works through the proxy (``/v1/responses``).

Text, reasoning and function calls, streamed and not; typed errors; the
key's output cap and token budget, as on the chat surface. Usage equals what
the simulator counted, and the audit row charges the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.simulator import PROMPT_OVERHEAD, THINKING, simulated_text
from tests.support.identity import Allowance, Limits, OptionCaps, identity_hook
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

pytest_plugins = ["tests.support.proxy_fixtures"]

PROMPT = "why is the sky blue"  # 5 words
PROMPT_TOKENS = 5 + PROMPT_OVERHEAD
CHUNKS = 20
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class _Recorder:
    def __init__(self, **fields: Any) -> None:
        self.request_ids: list[str] = []
        self.hook = identity_hook(self.request_ids, **{**new_ids(), **fields})


def _client(proxy: ProxyServer, recorder: _Recorder) -> openai.OpenAI:
    http = httpx.Client(event_hooks={"request": [recorder.hook]})
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key="not-used", http_client=http, max_retries=0
    )


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def client(proxy: ProxyServer, recorder: _Recorder) -> Iterator[openai.OpenAI]:
    with _client(proxy, recorder) as client:
        yield client


def _chats(sim: SimulatorServer) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.forwarded() if r["path"] == "/api/chat"]


async def test_create_and_stream_text(
    client: openai.OpenAI, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    response = client.responses.create(model="llama3.2", instructions="be brief", input=PROMPT)
    assert response.status == "completed"
    assert response.output_text == simulated_text(CHUNKS)
    assert response.usage is not None
    prompt = PROMPT_TOKENS + 2
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, CHUNKS)
    assert response.usage.total_tokens == prompt + CHUNKS

    items = [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]
    # as OpenAI does, a stream cut by max_output_tokens ends with response.incomplete
    # (the SDK's stream() helper waits for response.completed only: iterate the events)
    events = list(
        client.responses.create(model="llama3.2", input=items, max_output_tokens=5, stream=True)  # type: ignore[arg-type]
    )
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == simulated_text(5)
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert kinds.count("response.output_text.delta") == 5
    assert [e.sequence_number for e in events] == list(range(len(events)))

    first, second = _chats(sim)
    assert first["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": PROMPT},
    ]
    assert first["stream"] is False
    assert second["stream"] is True and second["options"]["num_predict"] == 5

    rows = await wait_audit_rows(store, recorder.request_ids)
    got = [rows[r] for r in recorder.request_ids]
    assert [r["route"] for r in got] == ["v1.responses", "v1.responses"]
    assert [r["streamed"] for r in got] == [False, True]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in got] == [
        (prompt, CHUNKS),
        (PROMPT_TOKENS, 5),
    ]


def test_function_calls_and_their_outputs(client: openai.OpenAI, sim: SimulatorServer) -> None:
    ask = "what is the weather in Paris"
    response = client.responses.create(model="llama3.2", input=ask, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}

    with client.responses.stream(model="llama3.2", input=ask, tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert [o.type for o in streamed.output] == ["function_call"]
    assert streamed.output[0].arguments == call.arguments  # type: ignore[union-attr]

    history: list[Any] = [
        {"role": "user", "content": ask},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]  # fmt: skip
    client.responses.create(model="llama3.2", input=history, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    sent = _chats(sim)[-1]
    assert sent["tools"] == [
        {"type": "function", "function": {
            "name": "get_weather", "parameters": WEATHER_TOOL["parameters"],
            "description": "The weather in a city"}}
    ]  # fmt: skip
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][2] == {
        "role": "tool",
        "content": "sunny",
        "tool_name": "get_weather",
        "tool_call_id": call.call_id,
    }


def test_reasoning_streamed_and_not(client: openai.OpenAI, sim: SimulatorServer) -> None:
    response = client.responses.create(model="llama3.2", input=PROMPT, reasoning={"effort": "high"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.summary[0].text == "".join(THINKING)
    assert message.type == "message"
    assert response.output_text == simulated_text(CHUNKS)

    with client.responses.stream(
        model="llama3.2", input=PROMPT, reasoning={"effort": "low"}
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_summary_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "".join(THINKING)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    client.responses.create(model="llama3.2", input=PROMPT, reasoning={"effort": "none"})
    assert [c.get("think") for c in _chats(sim)] == ["high", "low", False]


def test_json_schema_format_is_forwarded(client: openai.OpenAI, sim: SimulatorServer) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    response = client.responses.create(
        model="llama3.2",
        input=PROMPT,
        text={"format": {"type": "json_schema", "name": "x", "schema": schema}},
    )
    assert set(json.loads(response.output_text)) == {"x"}
    assert _chats(sim)[0]["format"] == schema


def test_errors_are_typed(client: openai.OpenAI, proxy: ProxyServer, sim: SimulatorServer) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="not-installed", input=PROMPT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model="llama3.2", input=PROMPT, previous_response_id="resp_1")
    assert stateful.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(
            model="llama3.2",
            input=[{"type": "item_reference", "id": "x"}],  # type: ignore[list-item]
        )
    unsigned = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="nz_wrong", max_retries=0)
    with unsigned, pytest.raises(openai.AuthenticationError):
        unsigned.responses.create(model="llama3.2", input=PROMPT)
    assert _chats(sim) == []

    sim.configure(failure="midstream_error", failure_after=3)
    with client.responses.stream(model="llama3.2", input=PROMPT) as stream:
        kinds = [e.type for e in stream]
    assert kinds[-1] == "response.failed"


def test_max_output_tokens_is_clamped_by_the_key_cap(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    recorder = _Recorder(caps=OptionCaps(max_num_predict=7))
    with _client(proxy, recorder) as client:
        response = client.responses.create(model="llama3.2", input=PROMPT, max_output_tokens=5000)
    assert response.status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 7
    assert _chats(sim)[0]["options"]["num_predict"] == 7


async def test_budget_refuses_what_does_not_fit(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    limits = Limits(daily_tokens=100)
    room = Allowance(remaining_daily_tokens=100)
    recorder = _Recorder(key_limits=limits, allowance=room)
    with _client(proxy, recorder) as client:
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model="llama3.2", input=PROMPT, max_output_tokens=5000)
        fits = client.responses.create(model="llama3.2", input=PROMPT, max_output_tokens=10)
    assert fits.usage is not None and fits.usage.output_tokens == 10
    rows = await wait_audit_rows(store, recorder.request_ids)
    assert [rows[r]["status"] for r in recorder.request_ids] == [429, 200]
