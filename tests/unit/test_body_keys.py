"""Field names Ollama (Go) would match case-insensitively are refused, at every struct position."""

from __future__ import annotations

from typing import Any

import pytest

from neuronetz_gateway.domain.body_keys import case_variant_field
from neuronetz_gateway.proxy.native import parse_object
from neuronetz_gateway.proxy.refusals import Refusal

KELVIN = "\u212a"
LONG_S = "\u017f"


def _chat(**message: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}, message]}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"Model": "m"}, "Model"),
        ({"model": "m", f"{KELVIN}eep_alive": 0}, f"{KELVIN}eep_alive"),
        ({"model": "m", f"{LONG_S}ystem": "x"}, f"{LONG_S}ystem"),
        ({"model": "m", "Options": {"num_predict": 0}}, "Options"),
        (_chat(role="user", Content="x" * 12000), "messages[1].Content"),
        (_chat(role="user", content="", Images=["aGk="]), "messages[1].Images"),
        (_chat(role="user", CONTENT="x"), "messages[1].CONTENT"),
        ({"model": "m", "options": {"Num_Predict": 0}}, "options.Num_Predict"),
        ({"model": "m", "options": {f"num_{KELVIN}eep": 1}}, f"options.num_{KELVIN}eep"),
        (
            _chat(role="assistant", tool_calls=[{"Function": {"name": "f"}}]),
            "messages[1].tool_calls[0].Function",
        ),
        (
            _chat(role="assistant", tool_calls=[{"function": {"Name": "f", "arguments": {}}}]),
            "messages[1].tool_calls[0].function.Name",
        ),
        ({"model": "m", "tools": [{"type": "function", "Function": {}}]}, "tools[0].Function"),
        ({"model": "m", "tools": [{"function": {"Description": "x" * 9000}}]},
         "tools[0].function.Description"),
    ],
)  # fmt: skip
def test_a_case_variant_at_a_struct_position_is_found(body: dict[str, Any], path: str) -> None:
    assert case_variant_field(body) == path


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "Hello", "options": {"num_predict": 5, "temperature": 0}},
        _chat(role="assistant", tool_calls=[{"function": {"name": "f",
              "arguments": {"City": "Paris", "userId": 1}}}]),
        {"model": "m", "format": {"type": "object", "properties": {"FullName": {}}}},
        {"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters":
            {"type": "object", "properties": {"userId": {"type": "string"}}}}}]},
        {"model": "m", "messages": "not a list", "options": None},
        {"model": "m", "messages": [1, "x", None, []]},
    ],
)  # fmt: skip
def test_the_clients_own_names_and_odd_shapes_pass(body: dict[str, Any]) -> None:
    assert case_variant_field(body) is None


def test_parse_object_refuses_a_case_variant_naming_it() -> None:
    with pytest.raises(Refusal) as refused:
        parse_object(b'{"model":"m","messages":[{"role":"user","Content":"x"}]}')
    assert (refused.value.status, refused.value.param) == (400, "messages[0].Content")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model":"m","prompt":"\xff"}', "UTF-8"),
        (b'{"model":"m","prompt":"\xc3"}', "UTF-8"),
        (b'{"model":"\xed\xa0\x80"}', "UTF-8"),  # an encoded surrogate
        (b'{"model":"m","options":{"num_predict":1e400}}', "JSON"),
        (b"\xef\xbb\xbf{}", "JSON"),
        (b"[" * 100_000, "JSON"),
    ],
)
def test_parse_object_answers_undecodable_bodies_with_a_400(body: bytes, says: str) -> None:
    with pytest.raises(Refusal) as refused:
        parse_object(body)
    assert refused.value.status == 400
    assert says in refused.value.message
