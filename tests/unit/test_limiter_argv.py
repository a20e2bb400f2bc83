"""The limiter's cache of decide / state ARGV per pair of limits (redis_limiter._limit_argv)."""

from __future__ import annotations

import pytest

from neuronetz_gateway.adapters import redis_limiter
from neuronetz_gateway.adapters.redis_limiter import _limit_argv
from neuronetz_gateway.domain.identity import Limits


def test_argv_follows_the_limits_when_they_change() -> None:
    tenant = Limits(daily_tokens=1000)
    assert _limit_argv(Limits(rpm=5), tenant) == (5, -1, -1, -1, -1, -1, -1, -1, -1, 1000, -1, -1)
    # new limits (a key edited): their own values, not the cached ones
    assert _limit_argv(Limits(rpm=6, tpm=100), tenant)[:2] == (6, 100)
    assert _limit_argv(Limits(rpm=5), Limits(total_tokens=7))[6:] == (-1,) * 5 + (7,)
    assert _limit_argv(Limits(), Limits()) == (-1,) * 12


def test_argv_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_limiter, "_MAX_CACHED_LIMITS", 8)
    monkeypatch.setattr(redis_limiter, "_LIMIT_ARGV", {})
    for rpm in range(100):
        assert _limit_argv(Limits(rpm=rpm), Limits())[0] == rpm
        assert len(redis_limiter._LIMIT_ARGV) <= 8
