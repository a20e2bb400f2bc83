"""OpenAI <-> Ollama translation, checked against the official ``openai`` client's types."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from neuronetz_gateway.domain.errors import InvalidInput
from neuronetz_gateway.domain.openai_compat import (
    ChatStreamTranslator,
    CompletionStreamTranslator,
    OllamaChunk,
    OllamaEmbedResponse,
    OllamaFunctionCall,
    OllamaModelEntry,
    OllamaResponseMessage,
    OllamaToolCall,
    TranslationError,
    chat_completion_body,
    completion_body,
    decode_ollama_chunk,
    decode_ollama_embed,
    decode_ollama_tags,
    embeddings_body,
    encode_ollama_request,
    error_event,
    model_body,
    models_list_body,
    ollama_error_to_openai,
    openai_error_body,
    owned_by,
    translate_chat_request,
    translate_completion_request,
    translate_embeddings_request,
    translation_error_body,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _chat(**fields: Any) -> dict[str, Any]:
    """Translate a chat request and return the Ollama JSON that would be sent."""
    fields.setdefault("model", "llama3.2")
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    result: dict[str, Any] = json.loads(
        encode_ollama_request(translate_chat_request(_body(**fields)).ollama)
    )
    return result


def _chat_error(**fields: Any) -> TranslationError:
    fields.setdefault("model", "llama3.2")
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(TranslationError) as info:
        translate_chat_request(_body(**fields))
    return info.value


# ----------------------------------------------------------------- chat requests


def test_minimal_chat_request_sets_stream_false_explicitly() -> None:
    # Ollama streams when "stream" is absent; OpenAI does not.
    assert _chat() == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }


def test_stream_and_include_usage() -> None:
    t = translate_chat_request(
        _body(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert t.ollama.stream is True
    assert t.include_usage is True
    assert json.loads(encode_ollama_request(t.ollama))["stream"] is True
    # include_usage means nothing without streaming.
    t = translate_chat_request(
        _body(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream_options={"include_usage": True},
        )
    )
    assert t.include_usage is False
    assert (
        translate_chat_request(
            _body(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        ).include_usage
        is False
    )


def test_sampling_options_map_to_ollama_options() -> None:
    out = _chat(
        stop="END",
        seed=7,
        temperature=0.5,
        top_p=0.9,
        frequency_penalty=0.25,
        presence_penalty=-0.5,
        max_tokens=12,
    )
    assert out["options"] == {
        "num_predict": 12,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["END"],
        "frequency_penalty": 0.25,
        "presence_penalty": -0.5,
    }
    assert _chat(stop=["a", "b"])["options"] == {"stop": ["a", "b"]}
    assert "options" not in _chat(stop=[])


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert _chat(max_completion_tokens=5)["options"] == {"num_predict": 5}
    assert _chat(max_tokens=9, max_completion_tokens=5)["options"] == {"num_predict": 5}


def test_messages_roles_and_content_parts() -> None:
    out = _chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "text", "text": "this?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        ]
    )
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "what is\nthis?", "images": [PNG]},
        {"role": "assistant", "content": "a cat"},
    ]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("https://example.com/cat.png", "not fetched"),
        ("http://169.254.169.254/latest", "not fetched"),
        ("data:text/plain;base64,aGk=", "data:image"),
        ("data:image/png,rawbytes", "data:image"),
        ("data:image/png;base64,", "data:image"),
        ("data:image/png;base64,@@not-base64@@", "not valid base64"),
    ],
)
def test_bad_image_urls_are_rejected(url: str, fragment: str) -> None:
    err = _chat_error(
        messages=[
            {"role": "user", "content": "x"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        ]
    )
    assert fragment in err.message
    assert err.param == "messages[1].content[0].image_url.url"
    assert err.code == "invalid_image_url"
    assert isinstance(err, InvalidInput)


def test_unknown_content_part_type_is_rejected() -> None:
    err = _chat_error(
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    )
    assert err.param == "messages[0].content[0].type"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tools_pass_through_and_tool_choice_none_withholds_them() -> None:
    assert _chat(tools=[WEATHER_TOOL])["tools"] == [WEATHER_TOOL]
    assert _chat(tools=[WEATHER_TOOL], tool_choice="auto")["tools"] == [WEATHER_TOOL]
    assert "tools" not in _chat(tools=[WEATHER_TOOL], tool_choice="none")


def test_bad_tools_are_rejected() -> None:
    err = _chat_error(tools=[{"type": "custom", "custom": {"name": "x"}}])
    assert err.param == "tools[0].type"
    err = _chat_error(tools=[WEATHER_TOOL, {"type": "function", "function": {"description": "x"}}])
    assert err.param == "tools[1].function.name"


def test_assistant_tool_calls_and_tool_results() -> None:
    out = _chat(
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_def",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_def", "content": "noon"},
            {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
            {"role": "tool", "tool_call_id": "unknown", "name": "legacy", "content": "?"},
        ]
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_abc"},
            {"function": {"name": "get_time", "arguments": {}}, "id": "call_def"},
        ],
    }
    # the ids reach Ollama (>= 0.12 links results by them), beside the names older ones use
    assert out["messages"][2] == {
        "role": "tool",
        "content": "noon",
        "tool_name": "get_time",
        "tool_call_id": "call_def",
    }
    assert out["messages"][3] == {
        "role": "tool",
        "content": "sunny",
        "tool_name": "get_weather",
        "tool_call_id": "call_abc",
    }
    assert out["messages"][4] == {
        "role": "tool",
        "content": "?",
        "tool_name": "legacy",
        "tool_call_id": "unknown",
    }


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]", '"text"'])
def test_tool_call_arguments_must_be_a_json_object(arguments: str) -> None:
    err = _chat_error(
        messages=[
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": arguments}}],
            }
        ]
    )
    assert err.param == "messages[0].tool_calls[0].function.arguments"


def test_tool_calls_on_a_user_message_are_rejected() -> None:
    err = _chat_error(
        messages=[{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]
    )
    assert err.param == "messages[0].tool_calls"


def test_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert _chat(response_format={"type": "json_object"})["format"] == "json"
    assert (
        _chat(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        )["format"]
        == schema
    )
    assert "format" not in _chat(response_format={"type": "text"})
    err = _chat_error(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.param == "response_format.json_schema.schema"
    err = _chat_error(response_format={"type": "xml"})
    assert err.param == "response_format.type"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": None}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stop": 5}, "stop"),
    ],
)
def test_invalid_chat_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(TranslationError) as info:
        translate_chat_request(_body(**body))
    assert info.value.param == param
    assert param in info.value.message or param in {"messages", "n"}


def test_invalid_json_is_a_translation_error() -> None:
    with pytest.raises(TranslationError) as info:
        translate_chat_request(b"{not json")
    assert info.value.param is None
    assert "JSON" in info.value.message


def test_translation_error_body_is_openais_error_object() -> None:
    err = _chat_error(n=3)
    assert json.loads(translation_error_body(err)) == {
        "error": {
            "message": "Only n=1 is supported.",
            "type": "invalid_request_error",
            "param": "n",
            "code": "unsupported_parameter",
        }
    }


# ----------------------------------------------------------------- completions, embeddings


def test_completion_request() -> None:
    t = translate_completion_request(
        _body(
            model="m",
            prompt="Once upon",
            suffix="end.",
            max_tokens=3,
            temperature=0.2,
            stop=["\n"],
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert json.loads(encode_ollama_request(t.ollama)) == {
        "model": "m",
        "prompt": "Once upon",
        "stream": True,
        "suffix": "end.",
        "options": {"num_predict": 3, "temperature": 0.2, "seed": 1, "stop": ["\n"]},
    }
    assert t.include_usage is True
    single = translate_completion_request(_body(model="m", prompt=["only one"]))
    assert single.ollama.prompt == "only one"
    assert single.ollama.stream is False


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "n": 2}, "n"),
        ({}, "prompt"),
    ],
)
def test_invalid_completion_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as info:
        translate_completion_request(_body(model="m", **fields))
    assert info.value.param == param


def test_embeddings_request() -> None:
    t = translate_embeddings_request(_body(model="e", input="hello"))
    assert json.loads(encode_ollama_request(t.ollama)) == {"model": "e", "input": "hello"}
    assert t.encoding_format == "float"
    t = translate_embeddings_request(
        _body(model="e", input=["a", "b"], dimensions=4, encoding_format="base64")
    )
    assert json.loads(encode_ollama_request(t.ollama)) == {
        "model": "e",
        "input": ["a", "b"],
        "dimensions": 4,
    }
    assert t.encoding_format == "base64"


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]], [], ["a", 1], 5])
def test_invalid_embedding_inputs(value: Any) -> None:
    with pytest.raises(TranslationError) as info:
        translate_embeddings_request(_body(model="e", input=value))
    assert info.value.param == "input"


# ----------------------------------------------------------------- responses

OLLAMA_CHAT = {
    "model": "llama3.2",
    "created_at": "2025-01-01T00:00:00Z",
    "message": {"role": "assistant", "content": "Hello there"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 5,
    "prompt_eval_count": 11,
    "eval_count": 7,
}


def test_chat_completion_body() -> None:
    resp = decode_ollama_chunk(json.dumps(OLLAMA_CHAT).encode())
    raw = json.loads(chat_completion_body(resp, request_id="r1", model="llama3.2", created=42))
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.id == "chatcmpl-r1"
    assert parsed.object == "chat.completion"
    assert parsed.created == 42
    assert parsed.model == "llama3.2"
    assert parsed.system_fingerprint == "fp_ollama"
    assert parsed.choices[0].message.content == "Hello there"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (11, 7)
    assert parsed.usage.total_tokens == 18
    assert "tool_calls" not in raw["choices"][0]["message"]


def test_chat_completion_body_length_and_tool_calls() -> None:
    length = OllamaChunk(
        message=OllamaResponseMessage(content="cut"), done=True, done_reason="length"
    )
    raw = json.loads(chat_completion_body(length, request_id="r", model="m"))
    assert ChatCompletion.model_validate(raw).choices[0].finish_reason == "length"
    assert isinstance(raw["created"], int)

    calls = OllamaChunk(
        message=OllamaResponseMessage(
            content="",
            tool_calls=[
                OllamaToolCall(OllamaFunctionCall("get_weather", {"city": "Paris"})),
                OllamaToolCall(OllamaFunctionCall("get_time", {})),
            ],
        ),
        done=True,
        done_reason="stop",
        prompt_eval_count=3,
        eval_count=1,
    )
    raw = json.loads(chat_completion_body(calls, request_id="r", model="m"))
    assert raw["choices"][0]["message"]["content"] is None  # present, null, as OpenAI sends
    parsed = ChatCompletion.model_validate(raw)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    ids = [c.id for c in choice.message.tool_calls]
    # Ollama sent no ids: fresh ones, unique within and across responses
    again = json.loads(chat_completion_body(calls, request_id="r", model="m"))
    ids += [c["id"] for c in again["choices"][0]["message"]["tool_calls"]]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == 4
    first = choice.message.tool_calls[0]
    assert first.type == "function"
    assert first.function.name == "get_weather"
    assert json.loads(first.function.arguments) == {"city": "Paris"}


def test_completion_body() -> None:
    resp = decode_ollama_chunk(
        b'{"model":"m","response":"once","done":true,"done_reason":"length",'
        b'"prompt_eval_count":2,"eval_count":1}'
    )
    raw = json.loads(completion_body(resp, request_id="r9", model="m", created=1))
    parsed = Completion.model_validate(raw)
    assert parsed.id == "cmpl-r9"
    assert parsed.object == "text_completion"
    assert parsed.choices[0].text == "once"
    assert parsed.choices[0].finish_reason == "length"
    assert parsed.usage is not None
    assert parsed.usage.total_tokens == 3


def test_embeddings_body_float_and_base64() -> None:
    resp = decode_ollama_embed(
        b'{"model":"e","embeddings":[[0.5,-0.25],[1.0,0.0]],"prompt_eval_count":4}'
    )
    raw = json.loads(embeddings_body(resp, model="e"))
    parsed = CreateEmbeddingResponse.model_validate(raw)
    assert [d.embedding for d in parsed.data] == [[0.5, -0.25], [1.0, 0.0]]
    assert [d.index for d in parsed.data] == [0, 1]
    assert parsed.data[0].object == "embedding"
    assert parsed.object == "list"
    assert parsed.model == "e"
    assert (parsed.usage.prompt_tokens, parsed.usage.total_tokens) == (4, 4)

    raw = json.loads(embeddings_body(resp, model="e", encoding_format="base64"))
    decoded = base64.b64decode(raw["data"][1]["embedding"])
    assert struct.unpack("<2f", decoded) == (1.0, 0.0)


def test_models_bodies() -> None:
    tags = decode_ollama_tags(
        b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest",'
        b'"modified_at":"2024-05-01T10:22:33.123456789-07:00","size":1},'
        b'{"name":"acme/tuned:v1","modified_at":"garbage"}]}'
    )
    raw = json.loads(models_list_body(tags.models))
    assert raw["object"] == "list"
    models = [Model.model_validate(m) for m in raw["data"]]
    assert [m.id for m in models] == ["llama3.2:latest", "acme/tuned:v1"]
    assert [m.owned_by for m in models] == ["library", "acme"]
    assert models[0].created == 1714584153
    assert models[1].created == 0
    one = Model.model_validate(json.loads(model_body(OllamaModelEntry("qwen2.5:0.5b"))))
    assert (one.id, one.object, one.owned_by) == ("qwen2.5:0.5b", "model", "library")


@pytest.mark.parametrize(
    ("name", "owner"),
    [("llama3.2", "library"), ("u/m:tag", "u"), ("hf.co/org/model:q4", "org"), ("a/b", "a")],
)
def test_owned_by(name: str, owner: str) -> None:
    assert owned_by(name) == owner


@pytest.mark.parametrize(
    ("status", "expected_status", "error_type", "code"),
    [
        (400, 400, "invalid_request_error", None),
        (404, 404, "invalid_request_error", "model_not_found"),
        (413, 400, "invalid_request_error", None),
        (429, 429, "rate_limit_error", "rate_limit_exceeded"),
        (500, 500, "server_error", None),
        (502, 502, "server_error", None),
        (503, 503, "server_error", "server_busy"),
        (504, 504, "server_error", None),
    ],
)
def test_ollama_error_to_openai(
    status: int, expected_status: int, error_type: str, code: str | None
) -> None:
    got_status, body = ollama_error_to_openai(status, "boom")
    assert got_status == expected_status
    error = json.loads(body)["error"]
    assert error["message"] == "boom"
    assert error["type"] == error_type
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}


def test_openai_error_body_shape() -> None:
    assert json.loads(openai_error_body("no", code="c", param="p")) == {
        "error": {"message": "no", "type": "invalid_request_error", "param": "p", "code": "c"}
    }


# ----------------------------------------------------------------- streaming


def _chat_lines(contents: list[str], *, done_reason: str = "stop") -> list[bytes]:
    lines = [
        json.dumps(
            {"model": "m", "message": {"role": "assistant", "content": c}, "done": False}
        ).encode()
        for c in contents
    ]
    final = {
        "model": "m",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": done_reason,
        "prompt_eval_count": 5,
        "eval_count": len(contents),
    }
    return [*lines, json.dumps(final).encode()]


def _frames(data: bytes) -> list[str]:
    assert data.endswith(b"\n\n")
    frames = data.decode().split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [f.removeprefix("data: ") for f in frames]


def _run(
    translator: ChatStreamTranslator | CompletionStreamTranslator, lines: list[bytes]
) -> list[str]:
    out = b"".join(translator.feed_line(line) for line in lines)
    return _frames(out)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_sequence(include_usage: bool) -> None:
    translator = ChatStreamTranslator("req1", "llama3.2", include_usage=include_usage, created=9)
    lines = _chat_lines(["Hel", 'lo "w"', "", "orld"])
    frames = _run(translator, [*lines[:2], b"", *lines[2:]])
    assert frames[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(f)) for f in frames[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-req1"}
    assert {c.created for c in chunks} == {9}
    assert {c.model for c in chunks} == {"llama3.2"}
    first = chunks[0].choices[0]
    assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
    contents = [c.choices[0].delta.content for c in chunks[1:4]]
    assert contents == ["Hel", 'lo "w"', "orld"]  # the empty Ollama chunk sends nothing
    assert all(json.loads(f)["choices"][0]["finish_reason"] is None for f in frames[:4])
    finish = chunks[4]
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    if include_usage:
        assert len(chunks) == 6
        assert chunks[5].choices == []
        assert chunks[5].usage is not None
        assert chunks[5].usage.prompt_tokens == 5
        assert chunks[5].usage.completion_tokens == 4
        assert chunks[5].usage.total_tokens == 9
    else:
        assert len(chunks) == 5
        assert all("usage" not in json.loads(f) for f in frames[:-1])
    assert translator.finished
    assert not translator.failed
    assert translator.content_chunks == 3
    assert (translator.prompt_tokens, translator.completion_tokens) == (5, 4)
    # Nothing after the end.
    assert translator.feed_line(_chat_lines(["late"])[0]) == b""


def test_chat_stream_content_frames_match_the_struct_encoding() -> None:
    # The hot path splices text into a pre-encoded template; it must equal
    # what a full encode of the same chunk gives.
    translator = ChatStreamTranslator("x", 'model "quoted"', created=1)
    frames = _run(translator, _chat_lines(['a\nb\u2603"\\']))
    assert json.loads(frames[1]) == {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": 'model "quoted"',
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "delta": {"content": 'a\nb\u2603"\\'}, "finish_reason": None}],
    }


def test_chat_stream_length_finish() -> None:
    frames = _run(ChatStreamTranslator("x", "m"), _chat_lines(["a", "b"], done_reason="length"))
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "length"


def test_chat_stream_tool_calls_accumulate_in_the_official_client() -> None:
    tool_chunk = {
        "model": "m",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {"tz": "UTC"}}},
            ],
        },
        "done": False,
    }
    lines = [json.dumps(tool_chunk).encode(), _chat_lines([])[-1]]
    frames = _run(ChatStreamTranslator("t", "m", include_usage=True), lines)
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for frame in frames[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(frame)))
    final = state.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [c[1:] for c in calls] == [
        ("get_weather", '{"city":"Paris"}'),
        ("get_time", '{"tz":"UTC"}'),
    ]
    assert all(c[0].startswith("call_") and len(c[0]) == 29 for c in calls)
    assert calls[0][0] != calls[1][0]
    assert final.usage is not None
    assert final.usage.completion_tokens == 0


def test_chat_stream_midstream_error() -> None:
    translator = ChatStreamTranslator("e", "m")
    out = translator.feed_line(_chat_lines(["a"])[0])
    out += translator.feed_line(b'{"error":"model runner crashed"}')
    frames = _frames(out)
    assert json.loads(frames[-1]) == {
        "error": {
            "message": "model runner crashed",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "[DONE]" not in frames
    assert translator.failed
    assert translator.finished
    assert translator.prompt_tokens is None
    assert translator.feed_line(_chat_lines([])[-1]) == b""


def test_fail_ends_the_stream_once() -> None:
    translator = CompletionStreamTranslator("f", "m", True)
    translator.feed_line(b'{"model":"m","response":"a","done":false}')
    frames = _frames(translator.fail("upstream closed the connection"))
    assert json.loads(frames[0])["error"]["message"] == "upstream closed the connection"
    assert (translator.failed, translator.finished) == (True, True)
    assert translator.fail("again") == b""
    done = ChatStreamTranslator("d", "m")
    done.feed_line(_chat_lines([])[-1])
    assert done.fail("late") == b""
    assert not done.failed


def test_error_event_frame() -> None:
    frame = error_event("upstream went away", code="upstream_error")
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert json.loads(frame[6:])["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_sequence(include_usage: bool) -> None:
    lines = [
        b'{"model":"m","response":"Once","done":false}',
        b'{"model":"m","response":" upon","done":false}',
        b'{"model":"m","response":"","done":true,"done_reason":"length",'
        b'"prompt_eval_count":3,"eval_count":2}',
    ]
    translator = CompletionStreamTranslator("c1", "m", include_usage=include_usage, created=5)
    frames = _run(translator, lines)
    assert frames[-1] == "[DONE]"
    raws = [json.loads(f) for f in frames[:-1]]
    assert [r["choices"][0]["text"] for r in raws[:3]] == ["Once", " upon", ""]
    assert [r["choices"][0]["finish_reason"] for r in raws[:3]] == [None, None, "length"]
    assert {r["id"] for r in raws} == {"cmpl-c1"}
    assert {r["object"] for r in raws} == {"text_completion"}
    Completion.model_validate(raws[2])  # the finish chunk is a complete Completion
    if include_usage:
        assert len(raws) == 4
        usage = Completion.model_validate(raws[3]).usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 2)
        assert raws[3]["choices"] == []
    else:
        assert len(raws) == 3
    assert translator.content_chunks == 2


# ----------------------------------------------------------------- the official client end to end


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.AsyncOpenAI:
    # openai 3.x is built on httpx2 (not httpx), so the mock transport is httpx2's.
    return openai.AsyncOpenAI(
        api_key="nz_test",
        base_url="http://gateway.test/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


def _sse(frames: Iterator[bytes] | list[bytes]) -> httpx2.Response:
    return httpx2.Response(
        200, content=b"".join(frames), headers={"content-type": "text/event-stream"}
    )


async def test_official_client_streams_chat_and_gets_usage() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        t = translate_chat_request(request.content)
        assert t.ollama.stream
        translator = ChatStreamTranslator("s1", t.ollama.model, include_usage=t.include_usage)
        return _sse(translator.feed_line(line) for line in _chat_lines(["Hi", " there"]))

    async with _client(handler) as client:
        stream = await client.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hi there"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 7


async def test_official_client_non_streaming_chat_completions_and_embeddings() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/chat/completions"):
            t = translate_chat_request(request.content)
            resp = decode_ollama_chunk(json.dumps(OLLAMA_CHAT).encode())
            return httpx2.Response(
                200, content=chat_completion_body(resp, request_id="n1", model=t.ollama.model)
            )
        if request.url.path.endswith("/completions"):
            c = translate_completion_request(request.content)
            resp = OllamaChunk(response="done", done=True, prompt_eval_count=1, eval_count=1)
            return httpx2.Response(
                200, content=completion_body(resp, request_id="n2", model=c.ollama.model)
            )
        e = translate_embeddings_request(request.content)
        embed = OllamaEmbedResponse([[0.25, 0.5]], prompt_eval_count=2)
        return httpx2.Response(
            200,
            content=embeddings_body(embed, model="e", encoding_format=e.encoding_format),
        )

    async with _client(handler) as client:
        chat = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hello"}]
        )
        completion = await client.completions.create(model="llama3.2", prompt="x")
        floats = await client.embeddings.create(model="e", input="x", encoding_format="float")
        b64 = await client.embeddings.create(model="e", input="x", encoding_format="base64")
    assert chat.choices[0].message.content == "Hello there"
    assert completion.choices[0].text == "done"
    assert floats.data[0].embedding == [0.25, 0.5]
    assert isinstance(b64.data[0].embedding, str)
    assert struct.unpack("<2f", base64.b64decode(b64.data[0].embedding)) == (0.25, 0.5)


async def test_official_client_raises_on_error_event_and_error_object() -> None:
    def streaming(request: httpx2.Request) -> httpx2.Response:
        translator = ChatStreamTranslator("x", "m")
        first = translator.feed_line(_chat_lines(["partial"])[0])
        return _sse([first, translator.feed_line(b'{"error":"runner died"}')])

    async with _client(streaming) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError, match="runner died"):
            async for _ in stream:
                pass

    def rejecting(request: httpx2.Request) -> httpx2.Response:
        try:
            translate_chat_request(request.content)
        except TranslationError as exc:
            return httpx2.Response(400, content=translation_error_body(exc))
        raise AssertionError("expected a TranslationError")

    async with _client(rejecting) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], n=2
            )
    assert info.value.param == "n"
    assert info.value.code == "unsupported_parameter"
