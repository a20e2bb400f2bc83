"""The official ``anthropic`` Python client works through the proxy (``/v1/messages``).

Text, thinking and tool use, streamed and not; ``count_tokens``; typed
errors; the key's output cap and token budget, as on the OpenAI surface.
Usage in every answer equals what the simulator counted, and the audit row
charges the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
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
USER = [{"role": "user", "content": PROMPT}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class _Recorder:
    def __init__(self, **fields: Any) -> None:
        self.request_ids: list[str] = []
        self.hook = identity_hook(self.request_ids, **{**new_ids(), **fields})


def _client(proxy: ProxyServer, recorder: _Recorder) -> anthropic.Anthropic:
    http = httpx2.Client(event_hooks={"request": [recorder.hook]})  # type: ignore[list-item]
    return anthropic.Anthropic(
        base_url=proxy.url, api_key="not-used", http_client=http, max_retries=0
    )


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def client(proxy: ProxyServer, recorder: _Recorder) -> Iterator[anthropic.Anthropic]:
    with _client(proxy, recorder) as client:
        yield client


def _chats(sim: SimulatorServer) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.forwarded() if r["path"] == "/api/chat"]


async def test_create_and_stream_text(
    client: anthropic.Anthropic, sim: SimulatorServer, recorder: _Recorder, store: Store
) -> None:
    message = client.messages.create(
        model="llama3.2", max_tokens=1024, system="be brief", messages=USER
    )  # type: ignore[arg-type]
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == simulated_text(CHUNKS)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    prompt = PROMPT_TOKENS + 2  # "be brief"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, CHUNKS)

    with client.messages.stream(model="llama3.2", max_tokens=5, messages=USER) as stream:  # type: ignore[arg-type]
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == simulated_text(5)  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert {"content_block_start", "text", "content_block_stop", "message_delta"} <= set(events)

    first, second = _chats(sim)
    assert first["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": PROMPT},
    ]
    assert first["stream"] is False and first["options"]["num_predict"] == 1024
    assert second["stream"] is True and second["options"]["num_predict"] == 5

    rows = await wait_audit_rows(store, recorder.request_ids)
    got = [rows[r] for r in recorder.request_ids]
    assert [r["route"] for r in got] == ["v1.messages", "v1.messages"]
    assert [r["streamed"] for r in got] == [False, True]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in got] == [
        (prompt, CHUNKS),
        (PROMPT_TOKENS, 5),
    ]
    assert all(r["status"] == 200 and r["model"] == "llama3.2:latest" for r in got)


def test_tool_use_and_tool_result(client: anthropic.Anthropic, sim: SimulatorServer) -> None:
    ask = [{"role": "user", "content": "what is the weather in Paris"}]
    message = client.messages.create(
        model="llama3.2", max_tokens=100, tools=[WEATHER_TOOL], messages=ask
    )  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert set(call.input) == {"city"}  # type: ignore[arg-type]

    with client.messages.stream(
        model="llama3.2", max_tokens=100, tools=[WEATHER_TOOL], messages=ask
    ) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.type for b in streamed.content] == ["tool_use"]
    assert streamed.content[0].input == call.input  # type: ignore[union-attr]

    history = [
        *ask,
        {"role": "assistant", "content": [call.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    client.messages.create(model="llama3.2", max_tokens=100, tools=[WEATHER_TOOL], messages=history)  # type: ignore[arg-type]
    sent = _chats(sim)[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][2] == {
        "role": "tool",
        "content": "sunny",
        "tool_name": "get_weather",
        "tool_call_id": call.id,
    }


def test_thinking_streamed_and_not(client: anthropic.Anthropic, sim: SimulatorServer) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = client.messages.create(
        model="llama3.2", max_tokens=2048, thinking=thinking, messages=USER
    )  # type: ignore[arg-type]
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "".join(THINKING)  # type: ignore[union-attr]
    assert message.usage.output_tokens == len(THINKING) + CHUNKS

    with client.messages.stream(
        model="llama3.2", max_tokens=2048, thinking=thinking, messages=USER
    ) as stream:  # type: ignore[arg-type]
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "".join(THINKING)  # type: ignore[union-attr]
    assert final.content[1].text == simulated_text(CHUNKS)  # type: ignore[union-attr]

    client.messages.create(
        model="llama3.2", max_tokens=10, thinking={"type": "disabled"}, messages=USER
    )  # type: ignore[arg-type]
    assert [c.get("think") for c in _chats(sim)] == [True, True, False]


def test_count_tokens_is_the_reservation_estimate(
    client: anthropic.Anthropic, sim: SimulatorServer
) -> None:
    counted = client.messages.count_tokens(model="llama3.2", messages=USER)  # type: ignore[arg-type]
    # ceil(19 chars / 4) + one message + the request's overhead
    assert counted.input_tokens == 5 + 4 + 4
    assert _chats(sim) == []  # nothing reached the model
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="not-installed", messages=USER)  # type: ignore[arg-type]


def test_errors_are_typed(
    client: anthropic.Anthropic, proxy: ProxyServer, sim: SimulatorServer
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="not-installed", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="llama3.2", max_tokens=0, messages=USER)  # type: ignore[arg-type]
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]

    unsigned = anthropic.Anthropic(base_url=proxy.url, api_key="nz_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        unsigned.messages.create(model="llama3.2", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    sim.configure(failure="midstream_error", failure_after=3)
    with (
        pytest.raises(anthropic.APIStatusError),
        client.messages.stream(model="llama3.2", max_tokens=10, messages=USER) as stream,  # type: ignore[arg-type]
    ):
        for _ in stream:
            pass
    sim.configure(failure="busy")
    with pytest.raises(anthropic.InternalServerError) as busy:
        client.messages.create(model="llama3.2", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert busy.value.status_code == 503
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_max_tokens_is_clamped_by_the_key_cap(proxy: ProxyServer, sim: SimulatorServer) -> None:
    recorder = _Recorder(caps=OptionCaps(max_num_predict=7))
    with _client(proxy, recorder) as client:
        message = client.messages.create(model="llama3.2", max_tokens=20000, messages=USER)  # type: ignore[arg-type]
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 7
    assert _chats(sim)[0]["options"]["num_predict"] == 7


async def test_budget_refuses_what_does_not_fit(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    # As on /v1/chat/completions: a client's max_tokens is reserved as asked
    # (after the cap), and a request that cannot fit the room is a 429.
    limits = Limits(daily_tokens=100)
    room = Allowance(remaining_daily_tokens=100)
    recorder = _Recorder(key_limits=limits, allowance=room)
    with _client(proxy, recorder) as client:
        with pytest.raises(anthropic.RateLimitError) as refused:
            client.messages.create(model="llama3.2", max_tokens=20000, messages=USER)  # type: ignore[arg-type]
        assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        fits = client.messages.create(model="llama3.2", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert fits.usage.output_tokens == 10
    rows = await wait_audit_rows(store, recorder.request_ids)
    assert [rows[r]["status"] for r in recorder.request_ids] == [429, 200]
