"""Anthropic Messages <-> Ollama /api/chat translation (pure)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from neuronetz_gateway.domain.anthropic_compat import (
    MessageStreamTranslator,
    count_tokens_body,
    message_body,
    stop_reason,
    translate_count_tokens_request,
    translate_messages_request,
)
from neuronetz_gateway.domain.ollama_chat import (
    SurfaceError,
    decode_chat_chunk,
    encode_chat_request,
    estimate_chat_prompt,
)

PNG = "iVBORw0KGgo="


def _translate(**fields: Any) -> dict[str, Any]:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    request = translate_messages_request(json.dumps(body).encode()).ollama
    decoded: dict[str, Any] = json.loads(encode_chat_request(request))
    return decoded


def test_plain_request_maps_sampling_and_system_blocks() -> None:
    out = _translate(
        system=[
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "b"},
        ],
        stop_sequences=["END"],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u"},
        stream=True,
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}],
        "stream": True,
        "options": {
            "num_predict": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["END"]
        },
    }  # fmt: skip
    assert _translate()["stream"] is False


def test_blocks_tools_and_thinking() -> None:
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xx"},
            {"type": "text", "text": "calling"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "42"}]},
            {"type": "text", "text": "and now?"},
        ]},
    ]  # fmt: skip
    tools = [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]
    out = _translate(
        messages=messages, tools=tools, thinking={"type": "enabled", "budget_tokens": 9}
    )
    assert out["think"] is True
    assert out["tools"] == [
        {"type": "function",
         "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    ]  # fmt: skip
    assert out["messages"] == [
        {"role": "user", "content": "look", "images": [PNG]},
        {"role": "assistant", "content": "calling", "thinking": "hmm",
         "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}, "id": "toolu_1"}]},
        {"role": "tool", "content": "42", "tool_name": "f", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "and now?"},
    ]  # fmt: skip
    assert _translate(thinking={"type": "disabled"})["think"] is False
    assert "tools" not in _translate(tools=tools, tool_choice={"type": "none"})
    assert "tools" in _translate(tools=tools, tool_choice={"type": "tool", "name": "f"})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]},
         "messages[0].content[0].type"),
        ({"tools": [{"name": "web_search", "type": "web_search_20250305"}]}, "tools[0].type"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}}]}]},
         "messages[0].content[0].source"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image",
             "source": {"type": "base64", "media_type": "image/png", "data": "!!"}}]}]},
         "messages[0].content[0].source.data"),
        ({"messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_untranslatable_requests_name_the_field(fields: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(SurfaceError) as refused:
        translate_messages_request(json.dumps(body).encode())
    assert refused.value.param == param


def test_not_json_is_refused() -> None:
    with pytest.raises(SurfaceError):
        translate_messages_request(b"{")


def test_count_tokens_needs_no_max_tokens_and_uses_the_estimator() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "system": "s" * 8}
    request = translate_count_tokens_request(json.dumps(body).encode())
    # 48 chars / 4 + two messages + the request
    assert estimate_chat_prompt(request) == 12 + 2 * 4 + 4
    assert json.loads(count_tokens_body(24)) == {"input_tokens": 24}


def test_stop_reasons() -> None:
    assert stop_reason("stop", tool_use=False) == "end_turn"
    assert stop_reason("length", tool_use=False) == "max_tokens"
    assert stop_reason("stop", tool_use=True) == "tool_use"
    assert stop_reason(None, tool_use=False) == "end_turn"


def test_message_body_has_thinking_text_and_tool_use() -> None:
    chunk = decode_chat_chunk(
        b'{"message":{"role":"assistant","content":"hi","thinking":"so",'
        b'"tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},'
        b'"done":true,"done_reason":"stop","prompt_eval_count":7,"eval_count":3}'
    )
    body = json.loads(message_body(chunk, message_id="msg_abc", model="m"))
    assert body == {
        "type": "message", "id": "msg_abc", "role": "assistant", "model": "m",
        "content": [
            {"type": "thinking", "thinking": "so", "signature": ""},
            {"type": "text", "text": "hi"},
            {"type": "tool_use", "id": "toolu_abc_0", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }  # fmt: skip


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in data.decode().split("\n\n"):
        if not frame:
            continue
        name, payload = frame.split("\n")
        assert name.startswith("event: ") and payload.startswith("data: ")
        decoded = json.loads(payload[6:])
        assert decoded["type"] == name[7:]
        out.append((name[7:], decoded))
    return out


def _line(**message: Any) -> bytes:
    return msgspec.json.encode({"message": {"role": "assistant", **message}, "done": False})


def test_stream_events_open_and_close_blocks_in_order() -> None:
    t = MessageStreamTranslator("msg_1", "m", prompt_estimate=11)
    out = t.opening()
    out += t.feed_line(_line(content="", thinking="a"))
    out += t.feed_line(_line(content="", thinking="b"))
    out += t.feed_line(_line(content="x"))
    out += t.feed_line(b"")
    out += t.feed_line(
        _line(content="", tool_calls=[{"function": {"name": "f", "arguments": {"q": 1}}}])
    )
    out += t.feed_line(b'{"message":{"role":"assistant","content":""},"done":true,'
                       b'"done_reason":"stop","prompt_eval_count":9,"eval_count":4}')  # fmt: skip
    events = _events(out)
    assert [n for n, _ in events] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop",  # thinking, then its signature
        "content_block_start", "content_block_delta", "content_block_stop",  # text
        "content_block_start", "content_block_delta", "content_block_stop",  # tool_use
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[0][1]["message"]["usage"] == {"input_tokens": 11, "output_tokens": 0}
    assert events[2][1]["content_block"]["type"] == "thinking"
    assert events[3][1]["delta"] == {"type": "thinking_delta", "thinking": "a"}
    assert events[5][1]["delta"]["type"] == "signature_delta"
    assert [e[1]["index"] for e in events[2:13]] == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert events[8][1]["delta"] == {"type": "text_delta", "text": "x"}
    assert events[10][1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_1_0",
        "name": "f",
        "input": {},
    }
    assert events[11][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"q":1}'}
    assert events[13][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[13][1]["usage"] == {"input_tokens": 9, "output_tokens": 4}
    assert (t.prompt_tokens, t.completion_tokens, t.content_chunks) == (9, 4, 4)
    assert t.finished and not t.failed
    assert t.feed_line(_line(content="late")) == b"" and t.ping() == b""


def test_stream_failure_is_an_error_event() -> None:
    t = MessageStreamTranslator("msg_1", "m", prompt_estimate=1)
    t.feed_line(_line(content="x"))
    ((name, body),) = _events(t.feed_line(b'{"error":"boom"}'))
    assert name == "error" and body["error"] == {"type": "api_error", "message": "boom"}
    assert t.failed and t.fail("again") == b""
    other = MessageStreamTranslator("msg_2", "m", prompt_estimate=1)
    ((name, body),) = _events(other.fail("cut"))
    assert name == "error" and body["error"]["message"] == "cut"


async def test_silence_between_reads_becomes_keepalive_ticks() -> None:
    import asyncio
    from collections.abc import AsyncIterator

    from neuronetz_gateway.proxy.relay import lines_or_silence

    async def slow() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0.25)
        yield b"b"

    got = [x async for x in lines_or_silence(slow(), 0.1)]
    assert got[0] == b"a" and got[-1] == b"b"
    assert got[1:-1] == [None] * (len(got) - 2) and len(got) >= 3


async def test_reads_closer_together_than_the_keepalive_never_tick() -> None:
    # the quiet spell is timed from each wait, not from the stream's first one: 40 reads
    # 10 ms apart outlast one keep-alive interval without any of them waiting that long
    import asyncio
    from collections.abc import AsyncIterator

    from neuronetz_gateway.proxy.relay import lines_or_silence

    async def steady() -> AsyncIterator[bytes]:
        for i in range(40):
            await asyncio.sleep(0.01)
            yield b"%d" % i

    got = [x async for x in lines_or_silence(steady(), 0.25)]
    assert got == [b"%d" % i for i in range(40)]


async def test_leaving_a_quiet_stream_early_cancels_its_read() -> None:
    import asyncio
    from collections.abc import AsyncIterator

    from neuronetz_gateway.proxy.relay import lines_or_silence

    cancelled = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"a"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield b"never"

    reads = lines_or_silence(stalls(), 0.05)
    assert await anext(reads) == b"a"
    assert await anext(reads) is None  # quiet for one interval
    await reads.aclose()
    assert cancelled.is_set()


def test_a_system_message_inside_messages_is_kept_in_place() -> None:
    # Claude Code 2.1 sends one after the first user turn
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
    ]
    assert _translate(messages=messages)["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "reminder"},
    ]
