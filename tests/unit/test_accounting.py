"""Token estimates, option caps, final counts, the NDJSON scan."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.accounting import (
    IMAGE_TOKENS,
    PER_MESSAGE_TOKENS,
    PER_REQUEST_TOKENS,
    CapRefusal,
    OutputPlan,
    apply_native_caps,
    capped_num_predict,
    decode_final_counts,
    estimate_native_prompt,
    estimate_prompt_tokens,
    native_num_predict,
    plan_output,
    response_text,
    token_room,
)
from neuronetz_gateway.domain.identity import Allowance, OptionCaps
from neuronetz_gateway.proxy.relay import NdjsonScan


def test_estimate_counts_chars_messages_and_images() -> None:
    assert estimate_prompt_tokens(["abcd", "e"]) == 2 + PER_REQUEST_TOKENS
    assert estimate_prompt_tokens([], messages=2, images=1) == (
        2 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS + IMAGE_TOKENS
    )


def test_native_estimates_per_route() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 8, "images": ["a", "b"]}, "junk"]}
    assert estimate_native_prompt("chat", chat) == (
        2 + 2 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS + 2 * IMAGE_TOKENS
    )
    assert estimate_native_prompt("generate", {"prompt": "abcd", "system": "abcd"}) == (
        2 + PER_REQUEST_TOKENS
    )
    assert estimate_native_prompt("embed", {"input": ["abcd", "abcd"]}) == (
        2 + 2 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS
    )
    assert estimate_native_prompt("show", {"model": "x"}) == 0
    with_tools = estimate_native_prompt("chat", {"messages": [], "tools": [{"a": "b" * 40}]})
    assert with_tools > PER_REQUEST_TOKENS


def test_reservation_uses_the_default_when_unbounded() -> None:
    # the client's own cap is kept, whatever the room
    assert plan_output(20, 2048, 10, room=5) == OutputPlan(20, forward_cap=False)
    # no token limit: nothing to bound, nothing forwarded
    assert plan_output(None, 2048, 10, room=None) == OutputPlan(2048, forward_cap=False)
    assert plan_output(-1, 2048, 10, room=None) == OutputPlan(2048, forward_cap=False)
    # a limit applies: the default, shrunk to the room after the prompt, forwarded
    assert plan_output(None, 2048, 10, room=10_000) == OutputPlan(2048, forward_cap=True)
    assert plan_output(None, 2048, 10, room=200) == OutputPlan(190, forward_cap=True)
    assert plan_output(-1, 2048, 10, room=200) == OutputPlan(190, forward_cap=True)
    assert plan_output(None, 2048, 10, room=5) == OutputPlan(1, forward_cap=True)


def test_token_room_is_the_tightest_remaining_allowance() -> None:
    assert token_room(Allowance()) is None
    assert token_room(Allowance(remaining_requests=3)) is None
    assert token_room(Allowance(remaining_tokens=500, remaining_daily_tokens=90)) == 90
    assert token_room(Allowance(remaining_monthly_tokens=7, remaining_total_tokens=9)) == 7
    assert native_num_predict({"options": {"num_predict": 12.0}}) == 12
    assert native_num_predict({"options": "x"}) is None


@pytest.mark.parametrize(
    ("requested", "cap", "expected"),
    [(None, None, None), (5, None, 5), (None, 10, 10), (-1, 10, 10), (50, 10, 10), (5, 10, 5)],
)
def test_capped_num_predict(requested: int | None, cap: int | None, expected: int | None) -> None:
    assert capped_num_predict(requested, cap) == expected


def test_native_caps_clamp_and_report_change() -> None:
    caps = OptionCaps(max_num_ctx=2048, max_num_predict=100)
    body: dict[str, object] = {"options": {"num_ctx": 8192, "temperature": 0.5}}
    assert apply_native_caps(body, caps) is True
    assert body["options"] == {"num_ctx": 2048, "temperature": 0.5, "num_predict": 100}
    untouched: dict[str, object] = {"options": {"num_ctx": 1024, "num_predict": 50}}
    assert apply_native_caps(untouched, caps) is False
    assert apply_native_caps({"model": "x"}, OptionCaps()) is False


@pytest.mark.parametrize(
    "body",
    [
        {"options": {"num_ctx": "8192"}},
        {"options": {"num_predict": True}},
        {"options": ["num_ctx"]},
    ],
)
def test_native_caps_refuse_unreadable_capped_options(body: dict[str, object]) -> None:
    with pytest.raises(CapRefusal):
        apply_native_caps(body, OptionCaps(max_num_ctx=2048, max_num_predict=100))


@pytest.mark.parametrize("value", [0, "0", "0s", -1, "-1", "-5m", "soon", 0.0])
def test_keep_alive_that_unloads_or_pins_is_refused(value: object) -> None:
    with pytest.raises(CapRefusal) as refused:
        apply_native_caps({"keep_alive": value}, OptionCaps())
    assert refused.value.param == "keep_alive"


def test_keep_alive_allowed_values_pass() -> None:
    apply_native_caps({"keep_alive": "10m"}, OptionCaps())
    apply_native_caps({"keep_alive": None}, OptionCaps())
    apply_native_caps({"keep_alive": 0}, OptionCaps(allow_keep_alive_override=True))


def test_final_counts_and_response_text() -> None:
    final = decode_final_counts(b'{"done":true,"prompt_eval_count":3,"eval_count":9,"x":[1]}')
    assert final is not None
    assert (final.done, final.prompt_eval_count, final.eval_count) == (True, 3, 9)
    assert decode_final_counts(b"not json") is None
    stream = b'{"response":"a"}\n{"message":{"content":"b"}}\nbad\n{"done":true}\n'
    assert response_text(stream) == "ab"


LINES = [
    b'{"message":{"content":"x \\"done\\":true"},"done":false}\n',
    b'{"message":{"content":"y"},"done":false}\n',
    b'{"done":true,"prompt_eval_count":5,"eval_count":2}\n',
]


@pytest.mark.parametrize("size", [1, 3, 7, 50, 1000])
def test_ndjson_scan_finds_the_final_counts_however_reads_split(size: int) -> None:
    data = b"".join(LINES)
    scan = NdjsonScan()
    for i in range(0, len(data), size):
        scan.feed(data[i : i + size])
    scan.close()
    assert scan.final is not None
    assert (scan.final.prompt_eval_count, scan.final.eval_count) == (5, 2)
    assert scan.lines == 3
    assert scan.error is None


def test_ndjson_scan_counts_a_cut_stream_and_spots_errors() -> None:
    scan = NdjsonScan()
    scan.feed(LINES[1] + LINES[1] + b'{"message":{"con')
    scan.close()
    assert scan.final is None
    assert scan.lines == 3  # the partial last line counts as what it produced
    failing = NdjsonScan()
    failing.feed(LINES[1] + b'{"error":"boom"}\n')
    failing.close()
    assert failing.error == "boom"
    assert failing.lines == 1
