"""OpenAI Responses <-> Ollama /api/chat translation (pure)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from neuronetz_gateway.domain.ollama_chat import (
    SurfaceError,
    decode_chat_chunk,
    encode_chat_request,
)
from neuronetz_gateway.domain.responses_compat import (
    ResponseStreamTranslator,
    response_body,
    translate_responses_request,
)

PNG = "iVBORw0KGgo="


def _translate(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    body.update(fields)
    translation = translate_responses_request(json.dumps(body).encode())
    decoded: dict[str, Any] = json.loads(encode_chat_request(translation.ollama))
    return decoded


def test_string_input_with_instructions_and_options() -> None:
    out = _translate(
        instructions="be brief", max_output_tokens=50, temperature=0.2, top_p=0.5,
        store=True, metadata={"a": "b"}, parallel_tool_calls=False, include=["x"],
        text={"format": {"type": "json_object"}, "verbosity": "low"},
    )  # fmt: skip
    assert out == {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "stream": False,
        "format": "json",
        "options": {"num_predict": 50, "temperature": 0.2, "top_p": 0.5},
    }


def test_items_become_one_conversation() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "rules"},
        {"role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
        ]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "calling"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": ""},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "ok"}]},
    ]  # fmt: skip
    tools = [
        {"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "web_search"},
        {"type": "custom", "name": "apply_patch"},
    ]
    out = _translate(input=items, tools=tools, reasoning={"effort": "medium"})
    assert out["think"] == "medium"
    assert out["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert out["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "look", "images": [PNG]},
        {"role": "assistant", "content": "calling", "thinking": "hmm", "tool_calls": [
            {"function": {"name": "f", "arguments": {"a": 1}}, "id": "c1"},
            {"function": {"name": "g", "arguments": {}}, "id": "c2"},
        ]},
        {"role": "tool", "content": "42", "tool_name": "f", "tool_call_id": "c1"},
        {"role": "tool", "content": "ok", "tool_name": "g", "tool_call_id": "c2"},
    ]  # fmt: skip
    assert "tools" not in _translate(tools=tools, tool_choice="none")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"input": []}, "input"),
        ({"input": None}, "input"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://169.254.169.254/x.png"}]}]},
         "input[0].content[0].image_url"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
         "input[0].arguments"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ],
)  # fmt: skip
def test_untranslatable_requests_name_the_field(fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "m", "input": "hi"}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(SurfaceError) as refused:
        translate_responses_request(json.dumps(body).encode())
    assert refused.value.param == param


def test_response_body() -> None:
    chunk = decode_chat_chunk(
        b'{"message":{"role":"assistant","content":"hi","thinking":"so",'
        b'"tool_calls":[{"id":"call_x","function":{"name":"f","arguments":{"a":1}}}]},'
        b'"done":true,"done_reason":"length","prompt_eval_count":7,"eval_count":3}'
    )
    body = json.loads(response_body(chunk, response_id="resp_abc", model="m", echo={}))
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [o["type"] for o in body["output"]] == ["reasoning", "message", "function_call"]
    assert body["output"][0]["summary"] == [{"type": "summary_text", "text": "so"}]
    assert body["output"][1]["content"][0]["text"] == "hi"
    assert body["output"][2]["call_id"] == "call_x"
    assert body["output"][2]["arguments"] == '{"a":1}'
    assert body["usage"]["total_tokens"] == 10
    assert body["store"] is False and body["previous_response_id"] is None


def _events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in data.decode().split("\n\n"):
        if not frame:
            continue
        name, payload = frame.split("\n")
        decoded: dict[str, Any] = json.loads(payload[6:])
        assert decoded["type"] == name[7:]
        out.append(decoded)
    return out


def _line(**message: Any) -> bytes:
    return msgspec.json.encode({"message": {"role": "assistant", **message}, "done": False})


def test_stream_events_in_order_with_sequence_numbers() -> None:
    t = ResponseStreamTranslator("resp_1", "m", {})
    out = t.opening()
    out += t.feed_line(_line(content="", thinking="a"))
    out += t.feed_line(_line(content="x"))
    out += t.feed_line(_line(content="y"))
    out += t.feed_line(_line(content="", tool_calls=[{"function": {"name": "f"}}]))
    out += t.feed_line(b'{"message":{"role":"assistant","content":""},"done":true,'
                       b'"done_reason":"stop","prompt_eval_count":9,"eval_count":4}')  # fmt: skip
    events = _events(out)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[12]["text"] == "xy"
    done = events[-1]["response"]
    assert [o["type"] for o in done["output"]] == ["reasoning", "message", "function_call"]
    assert done["usage"]["input_tokens"] == 9 and done["usage"]["output_tokens"] == 4
    assert (t.prompt_tokens, t.completion_tokens) == (9, 4)
    assert t.ping() == b""


def test_stream_failure_and_empty_answer() -> None:
    t = ResponseStreamTranslator("resp_1", "m", {})
    (failed,) = _events(t.feed_line(b'{"error":"boom"}'))
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "boom"}
    assert t.failed and t.fail("again") == b""
    empty = ResponseStreamTranslator("resp_2", "m", {})
    events = _events(empty.feed_line(b'{"done":true,"done_reason":"stop"}'))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
