"""The key-info answer, rendered from a signed state: every limit kind, both levels, resets."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec

from neuronetz_gateway.domain.identity import (
    Identity,
    Limits,
    OptionCaps,
    sign_identity,
    verify_identity,
)
from neuronetz_gateway.domain.key_info import allowance_of, render_key_info
from neuronetz_gateway.domain.key_state import KeyState, LevelState, WindowState, window_reset_ms

# 2026-12-31T23:59:30.250Z: the next day and the next month are 29.75 s away
READ_AT = int(datetime(2026, 12, 31, 23, 59, 30, 250_000, tzinfo=UTC).timestamp() * 1000)


def _identity(key_limits: Limits, tenant_limits: Limits, state: KeyState) -> Identity:
    return Identity(
        request_id="r1",
        tenant_id=3,
        tenant_name="acme",
        key_id=7,
        key_prefix="nz_abc12345",
        route="v1.key",
        expires_at_ms=READ_AT + 30_000,
        models=["llama3.2:latest"],
        caps=OptionCaps(max_num_ctx=4096),
        key_limits=key_limits,
        tenant_limits=tenant_limits,
        key_state=state,
    )


def _render(key_limits: Limits, tenant_limits: Limits, state: KeyState) -> dict[str, object]:
    identity = _identity(key_limits, tenant_limits, state)
    body: dict[str, object] = json.loads(render_key_info(identity, state))
    return body


def test_window_reset_is_when_remaining_next_grows() -> None:
    assert window_reset_ms([], 10) is None
    # under the limit: the oldest entry leaving adds room
    assert window_reset_ms([(5_000, 1), (1_000, 1)], 10) == 61_000
    # at the limit (3 of 3): the oldest leaving makes room
    assert window_reset_ms([(1_000, 1), (2_000, 1), (3_000, 1)], 3) == 61_000
    # over a lowered limit (5 used, limit 3): three must leave
    entries = [(t * 1000, 1) for t in range(1, 6)]
    assert window_reset_ms(entries, 3) == 63_000
    # token buckets: 70 of 100 used in the oldest second, 40 in the next: that one binds
    assert window_reset_ms([(1_000, 70), (2_000, 40)], 100) == 61_000
    assert window_reset_ms([(1_000, 5), (2_000, 100)], 100) == 62_000


def test_every_limit_kind_at_the_key_level() -> None:
    limits = Limits(
        rpm=10, tpm=1000, concurrency=2, daily_tokens=500, monthly_tokens=5000, total_tokens=9000
    )
    state = KeyState(
        read_at_ms=READ_AT,
        key=LevelState(
            requests=WindowState(4, READ_AT + 12_500),
            tokens=WindowState(300, READ_AT + 40_000),
            concurrency=1,
            daily_tokens=120,
            monthly_tokens=1200,
            total_tokens=8000,
        ),
    )
    body = _render(limits, Limits(), state)
    assert body["prefix"] == "nz_abc12345"
    assert body["tenant"] == "acme"
    assert body["models"] == ["llama3.2:latest"]
    assert body["read_at"] == "2026-12-31T23:59:30.250Z"
    figures = body["limits"]
    assert isinstance(figures, dict)
    expect = {
        "requests_per_minute": (10, 4, 6, "2026-12-31T23:59:42.750Z", 13),
        "tokens_per_minute": (1000, 300, 700, "2027-01-01T00:00:10.250Z", 40),
        "concurrency": (2, 1, 1, None, None),
        "daily_tokens": (500, 120, 380, "2027-01-01T00:00:00.000Z", 30),
        "monthly_tokens": (5000, 1200, 3800, "2027-01-01T00:00:00.000Z", 30),
        "total_tokens": (9000, 8000, 1000, None, None),
    }
    for name, (limit, used, remaining, resets_at, resets_in) in expect.items():
        entry = figures[name]
        got = (
            entry["limit"],
            entry["used"],
            entry["remaining"],
            entry["resets_at"],
            entry["resets_in_seconds"],
        )
        assert got == (limit, used, remaining, resets_at, resets_in), name
        assert entry["level"] == "key"
        assert entry["tenant"] is None
        assert entry["key"]["remaining"] == remaining


def test_the_level_with_less_left_binds_and_both_are_shown() -> None:
    key_limits = Limits(rpm=10, daily_tokens=1000)
    tenant_limits = Limits(rpm=100, daily_tokens=5000)
    state = KeyState(
        read_at_ms=READ_AT,
        key=LevelState(requests=WindowState(2, READ_AT + 1000), daily_tokens=100),
        tenant=LevelState(requests=WindowState(95, READ_AT + 2000), daily_tokens=4500),
    )
    figures = _render(key_limits, tenant_limits, state)["limits"]
    assert isinstance(figures, dict)
    rpm = figures["requests_per_minute"]
    assert (rpm["level"], rpm["limit"], rpm["remaining"]) == ("tenant", 100, 5)
    assert rpm["key"]["remaining"] == 8
    assert rpm["tenant"]["used"] == 95
    daily = figures["daily_tokens"]
    assert (daily["level"], daily["remaining"]) == ("tenant", 500)
    assert daily["key"]["remaining"] == 900


def test_spent_and_overspent_limits_show_zero_remaining() -> None:
    limits = Limits(daily_tokens=0, total_tokens=100)
    state = KeyState(read_at_ms=READ_AT, key=LevelState(daily_tokens=0, total_tokens=130))
    figures = _render(limits, Limits(), state)["limits"]
    assert isinstance(figures, dict)
    assert figures["daily_tokens"]["remaining"] == 0
    assert figures["total_tokens"]["remaining"] == 0
    assert figures["total_tokens"]["used"] == 130


def test_unlimited_everywhere_reads_as_nulls() -> None:
    state = KeyState(read_at_ms=READ_AT)
    figures = _render(Limits(), Limits(), state)["limits"]
    assert isinstance(figures, dict)
    assert set(figures) == {
        "requests_per_minute",
        "tokens_per_minute",
        "concurrency",
        "daily_tokens",
        "monthly_tokens",
        "total_tokens",
    }
    for entry in figures.values():
        assert entry["limit"] is None
        assert entry["key"] is None
        assert entry["tenant"] is None


def test_an_empty_window_has_no_reset() -> None:
    state = KeyState(read_at_ms=READ_AT, key=LevelState(requests=WindowState(0, None)))
    figures = _render(Limits(rpm=5), Limits(), state)["limits"]
    assert isinstance(figures, dict)
    rpm = figures["requests_per_minute"]
    assert (rpm["remaining"], rpm["resets_at"], rpm["resets_in_seconds"]) == (5, None, None)


def test_allowance_of_a_state_is_the_tighter_level() -> None:
    state = KeyState(
        read_at_ms=READ_AT,
        key=LevelState(requests=WindowState(3, None), tokens=WindowState(10, None)),
        tenant=LevelState(tokens=WindowState(950, None)),
    )
    allowance = allowance_of(state, Limits(rpm=5, tpm=100), Limits(tpm=1000))
    assert (allowance.limit_requests, allowance.remaining_requests) == (5, 2)
    assert (allowance.limit_tokens, allowance.remaining_tokens) == (1000, 50)


def test_the_state_survives_signing() -> None:
    state = KeyState(
        read_at_ms=READ_AT,
        key=LevelState(requests=WindowState(1, READ_AT + 5), concurrency=0),
        tenant=LevelState(total_tokens=7),
    )
    identity = _identity(Limits(rpm=3), Limits(total_tokens=10), state)
    secret = b"s" * 40
    back = verify_identity(sign_identity(identity, secret), secret, READ_AT)
    assert back.key_state == state
    # other routes carry none, and pay nothing for it in the token
    plain = msgspec.structs.replace(identity, key_state=None, route="chat")
    assert b"key_state" not in msgspec.json.encode(plain)
