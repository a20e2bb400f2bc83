"""GPU-bounding options read as Ollama reads them, before any cap."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.accounting import (
    CapRefusal,
    apply_native_caps,
    native_num_predict,
    plan_output,
)
from neuronetz_gateway.domain.durations import (
    KEEP_FOREVER,
    DurationError,
    keep_alive_nanoseconds,
    parse_go_duration,
)
from neuronetz_gateway.domain.identity import OptionCaps
from neuronetz_gateway.domain.options import (
    MAX_OUTPUT_TOKENS,
    KeepAliveWindow,
    OptionError,
    check_keep_alive,
    context_size,
    output_limit,
)

S = 1_000_000_000


# ---------------------------------------------------------------- Go's time.ParseDuration


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("+0", 0),
        ("-0", 0),
        ("0s", 0),
        ("1ns", 1),
        ("1.5s", 1_500_000_000),
        (".5s", 500_000_000),
        ("5.s", 5 * S),
        ("1h30m", 5400 * S),
        ("1h1m1s1ms1us1ns", 3661 * S + 1_001_001),
        ("1\u00b5s", 1000),
        ("1\u03bcs", 1000),
        ("-1m", -60 * S),
        ("999999h", 999999 * 3600 * S),
        ("2562047h47m16.854775807s", 2**63 - 1),
        ("0.000000001s", 1),
        ("0.0000000001s", 0),
    ],
)
def test_parse_go_duration_reads_what_go_reads(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    "text",
    ["", "-", "1", "-1", "s", ".s", "1 s", " 1s", "1s ", "5 minutes", "1d", "1S", "1e3s",
     "2562048h", "9223372036854775808ns", "99999999999999999999s", "1.2.3s", "\u0661s"],
)  # fmt: skip
def test_parse_go_duration_refuses_what_go_refuses(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        (None, None),
        (300, 300 * S),
        (0, 0),
        (0.5, 0),  # int(0.5) seconds: unload now
        (1e-9, 0),
        (59.99, 59 * S),
        (-1, KEEP_FOREVER),
        (-0.5, KEEP_FOREVER),
        ("-5m", KEEP_FOREVER),
        ("10m", 600 * S),
        ("1ns", 1),
    ],
)
def test_keep_alive_as_ollama_holds_the_model(value: object, ns: int | None) -> None:
    assert keep_alive_nanoseconds(value) == ns


@pytest.mark.parametrize("value", [1e300, 10**30, True, [1], {"s": 1}, "soon", "-1"])
def test_keep_alive_that_ollama_cannot_read_or_overflows(value: object) -> None:
    with pytest.raises(DurationError):
        keep_alive_nanoseconds(value)


WINDOW = KeepAliveWindow(min_seconds=60, max_seconds=86400)


@pytest.mark.parametrize(
    "value",
    ["1ns", "59s", 0.5, 59.9, 0, "0", "0s", -1, "-1m", "999999h", "24h0m1s", 86401, 1e300,
     "soon", True],
)  # fmt: skip
def test_keep_alive_outside_the_window_is_refused_naming_it(value: object) -> None:
    with pytest.raises(OptionError) as refused:
        check_keep_alive(value, WINDOW)
    assert refused.value.param == "keep_alive"
    assert "keep_alive" in refused.value.message


@pytest.mark.parametrize("value", [None, 60, 60.9, "1m", "5m", "24h", 86400, "1h30m"])
def test_keep_alive_inside_the_window_passes(value: object) -> None:
    check_keep_alive(value, WINDOW)


def test_native_caps_use_the_given_window_unless_the_key_may_override() -> None:
    narrow = KeepAliveWindow(min_seconds=600, max_seconds=3600)
    with pytest.raises(CapRefusal):
        apply_native_caps({"keep_alive": "5m"}, OptionCaps(), narrow)
    apply_native_caps({"keep_alive": "30m"}, OptionCaps(), narrow)
    apply_native_caps({"keep_alive": "1ns"}, OptionCaps(allow_keep_alive_override=True), narrow)
    with pytest.raises(CapRefusal):
        apply_native_caps({"keep_alive": "999999h"}, OptionCaps())  # the default window


# ---------------------------------------------------------------- num_predict, num_ctx


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (None, None),
        (0, None),
        (0.5, None),
        (1e-9, None),
        (0.999, None),
        (-1, None),
        (-2, None),
        (-0.5, None),
        (1e300, None),  # int64(1e300) overflows: negative on amd64
        (10**30, None),
        (MAX_OUTPUT_TOKENS + 1, None),
        (1, 1),
        (1.9, 1),
        (16, 16),
        (16.0, 16),
        (MAX_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS),
    ],
)
def test_output_limit_reads_num_predict_as_ollama(value: object, limit: int | None) -> None:
    assert output_limit("options.num_predict", value) == limit


@pytest.mark.parametrize("value", ["16", True, [16], {"n": 1}])
def test_output_limit_refuses_what_is_not_a_number(value: object) -> None:
    with pytest.raises(OptionError) as refused:
        output_limit("options.num_predict", value)
    assert refused.value.param == "options.num_predict"


@pytest.mark.parametrize("value", [0, 0.5, 1e-9, -1, -2, 1e300])
def test_unbounded_num_predict_becomes_the_cap(value: object) -> None:
    body: dict[str, object] = {"options": {"num_predict": value}}
    assert apply_native_caps(body, OptionCaps(max_num_predict=16)) is True
    assert body["options"] == {"num_predict": 16}
    assert native_num_predict(body) == 16


@pytest.mark.parametrize("value", [0, 0.5, 1e-9, -1, 1e300])
def test_unbounded_num_predict_without_cap_is_planned_and_forwarded(value: object) -> None:
    body: dict[str, object] = {"options": {"num_predict": value}}
    apply_native_caps(body, OptionCaps())
    bound = native_num_predict(body)
    assert bound is None
    # a budget applies: the plan bounds the output and forwards it
    assert plan_output(bound, 2048, 10, room=50) == plan_output(None, 2048, 10, room=50)
    assert plan_output(bound, 2048, 10, room=50).forward_cap is True


def test_fractional_num_predict_is_forwarded_as_the_integer_ollama_reads() -> None:
    body: dict[str, object] = {"options": {"num_predict": 12.7}}
    assert apply_native_caps(body, OptionCaps()) is True
    assert body["options"] == {"num_predict": 12}
    body = {"options": {"num_predict": 12.7}}
    apply_native_caps(body, OptionCaps(max_num_predict=100))
    assert body["options"] == {"num_predict": 12}


@pytest.mark.parametrize(
    ("value", "size"),
    [(None, None), (0, None), (0.5, None), (-1, None), (1e300, None), (4096, 4096), (4096.9, 4096)],
)
def test_context_size_reads_num_ctx_as_ollama(value: object, size: int | None) -> None:
    assert context_size("options.num_ctx", value) == size


@pytest.mark.parametrize("value", [0, 0.5, -1, 1e300])
def test_capped_num_ctx_that_asks_for_nothing_falls_back_to_the_server_default(
    value: object,
) -> None:
    body: dict[str, object] = {"options": {"num_ctx": value, "temperature": 0}}
    assert apply_native_caps(body, OptionCaps(max_num_ctx=2048)) is True
    assert body["options"] == {"temperature": 0}


def test_capped_num_ctx_is_clamped_and_made_an_integer() -> None:
    body: dict[str, object] = {"options": {"num_ctx": 1e12}}
    apply_native_caps(body, OptionCaps(max_num_ctx=2048))
    assert body["options"] == {"num_ctx": 2048}
    body = {"options": {"num_ctx": 1024.5}}
    apply_native_caps(body, OptionCaps(max_num_ctx=2048))
    assert body["options"] == {"num_ctx": 1024}
