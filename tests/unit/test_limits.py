"""The pure limit arithmetic: periods, Retry-After, decisions, allowances, headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.limits import (
    TOTAL_BUDGET_RETRY_AFTER,
    Decision,
    LevelUsage,
    Refusal,
    budget_retry_after,
    compute_allowance,
    day_id,
    day_start,
    decide,
    month_id,
    month_start,
    period_ids,
    ratelimit_header_pairs,
    ratelimit_headers,
    rpm_retry_after,
    seconds_until_next_day,
    seconds_until_next_month,
    tpm_retry_after,
    tpm_window_seconds,
)


def utc(*args: int, microsecond: int = 0) -> datetime:
    return datetime(*args, microsecond=microsecond, tzinfo=UTC)  # type: ignore[misc]


# periods ---------------------------------------------------------------------


def test_period_ids_are_utc_calendar() -> None:
    now = utc(2026, 11, 26, 23, 59, 59)
    assert day_id(now) == "20261126"
    assert month_id(now) == "202611"
    # 01:30 in UTC+2 is still the previous UTC day
    cet = datetime(2026, 11, 27, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert day_id(cet) == "20261126"
    assert day_start(cet) == utc(2026, 11, 26)
    assert month_start(cet) == utc(2026, 11, 1)


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        day_id(datetime(2026, 1, 1))  # naive on purpose


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 11, 26, 23, 59, 30), 30),
        (utc(2026, 11, 26, 23, 59, 59, microsecond=200_000), 1),  # rounded up, never 0
        (utc(2026, 11, 26, 0, 0, 0), 86_400),  # midnight starts a whole new day
        (utc(2026, 12, 31, 23, 0, 0), 3600),
    ],
)
def test_seconds_until_next_day(now: datetime, expected: int) -> None:
    assert seconds_until_next_day(now) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (utc(2026, 11, 30, 23, 0, 0), 3600),
        (utc(2026, 12, 31, 23, 59, 59), 1),  # year rollover
        (utc(2028, 2, 28, 0, 0, 0), 2 * 86_400),  # leap February
        (utc(2027, 2, 28, 0, 0, 0), 86_400),
        (utc(2026, 11, 1, 0, 0, 0), 30 * 86_400),
    ],
)
def test_seconds_until_next_month(now: datetime, expected: int) -> None:
    assert seconds_until_next_month(now) == expected


# Retry-After -----------------------------------------------------------------


def test_rpm_retry_after_waits_for_the_leaving_hit() -> None:
    now_ms = 1_000_000
    assert rpm_retry_after(now_ms - 59_000, now_ms) == 1
    assert rpm_retry_after(now_ms - 58_500, now_ms) == 2  # 1.5 s rounds up
    assert rpm_retry_after(now_ms, now_ms) == 60
    assert rpm_retry_after(now_ms - 60_000, now_ms) == 1  # already gone: never 0


def test_tpm_window_is_the_last_sixty_seconds() -> None:
    window = tpm_window_seconds(1_000_500)
    assert len(window) == 60
    assert window[0] == 941
    assert window[-1] == 1000


def test_tpm_retry_after_expires_buckets_oldest_first() -> None:
    now_ms = 1_000_500  # second 1000, half way through
    buckets = {950: 40, 970: 30, 1000: 30}  # 100 in the window
    # one more token needs the 40 at second 950 gone: at 1010 -> 9.5 s -> 10
    assert tpm_retry_after(buckets, now_ms, tpm=100, incoming=1) == 10
    # 50 more need 950 and 970 gone: at 1030 -> 29.5 -> 30
    assert tpm_retry_after(buckets, now_ms, tpm=100, incoming=50) == 30
    # 71 need everything gone, the last bucket leaves at 1060
    assert tpm_retry_after(buckets, now_ms, tpm=100, incoming=71) == 60
    # buckets outside the window do not count
    assert tpm_retry_after({900: 1000, 1000: 10}, now_ms, tpm=100, incoming=1) == 1
    # larger than the whole limit: never fits, the full window
    assert tpm_retry_after({}, now_ms, tpm=100, incoming=101) == 60


def test_budget_retry_after() -> None:
    now = utc(2026, 11, 30, 23, 59, 0)
    assert budget_retry_after("daily_tokens", now) == 60
    assert budget_retry_after("monthly_tokens", now) == 60
    assert budget_retry_after("total_tokens", now) == TOTAL_BUDGET_RETRY_AFTER
    with pytest.raises(ValueError, match="not a budget"):
        budget_retry_after("rpm", now)


# decisions ---------------------------------------------------------------------


def test_decide_allows_without_refusals() -> None:
    allowance = Allowance(limit_requests=5, remaining_requests=4)
    decision = decide([], allowance, lease_id="abc")
    assert decision == Decision(allowed=True, lease_id="abc", allowance=allowance)
    assert decision.error_code is None


def test_decide_names_the_longest_wait() -> None:
    decision = decide(
        [
            Refusal("concurrency", "tenant", 1),
            Refusal("daily_tokens", "key", 3600),
            Refusal("rpm", "key", 12),
        ],
        Allowance(),
        lease_id="never-for-a-refusal",
    )
    assert not decision.allowed
    assert (decision.reason, decision.level, decision.retry_after) == ("daily_tokens", "key", 3600)
    assert decision.lease_id is None
    assert decision.error_code == "budget_exceeded"


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("rpm", "rate_limit_exceeded"),
        ("concurrency", "rate_limit_exceeded"),
        ("tpm", "rate_limit_exceeded"),
        ("daily_tokens", "budget_exceeded"),
        ("monthly_tokens", "budget_exceeded"),
        ("total_tokens", "budget_exceeded"),
    ],
)
def test_error_codes(reason: str, code: str) -> None:
    assert Decision(allowed=False, reason=reason, level="key", retry_after=1).error_code == code


def test_decision_default_allowance_is_empty() -> None:
    assert Decision(allowed=True).allowance == Allowance()


# allowance ---------------------------------------------------------------------


def test_allowance_takes_the_tighter_level() -> None:
    allowance = compute_allowance(
        Limits(rpm=10, tpm=1000, daily_tokens=500, total_tokens=10_000),
        Limits(rpm=100, tpm=2000, daily_tokens=5000, monthly_tokens=9000),
        LevelUsage(requests=3, window_tokens=900, daily=100, monthly=None, total=2000),
        LevelUsage(requests=95, window_tokens=100, daily=4800, monthly=8000, total=None),
    )
    assert allowance == Allowance(
        limit_requests=100,  # tenant: 5 left beats the key's 7
        remaining_requests=5,
        limit_tokens=1000,  # key: 100 left beats the tenant's 1900
        remaining_tokens=100,
        remaining_daily_tokens=200,  # tenant 5000-4800
        remaining_monthly_tokens=1000,  # only the tenant has one
        remaining_total_tokens=8000,  # only the key has one
    )


def test_allowance_unlimited_is_none_and_overspent_is_zero() -> None:
    assert compute_allowance(Limits(), Limits(), LevelUsage(), LevelUsage()) == Allowance()
    over = compute_allowance(Limits(daily_tokens=10), Limits(), LevelUsage(daily=25), LevelUsage())
    assert over.remaining_daily_tokens == 0
    # a limit whose counter is unknown says nothing rather than guessing
    assert compute_allowance(Limits(rpm=5), Limits(), LevelUsage(), LevelUsage()) == Allowance()


def test_ratelimit_headers_only_known_values() -> None:
    assert ratelimit_headers(Allowance()) == {}
    headers = ratelimit_headers(
        Allowance(
            limit_requests=60,
            remaining_requests=0,
            remaining_daily_tokens=1234,
            remaining_total_tokens=5,
        )
    )
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-remaining-daily-tokens": "1234",
        "x-ratelimit-remaining-total-tokens": "5",
    }
    full = ratelimit_headers(
        Allowance(1, 2, 3, 4, remaining_daily_tokens=5, remaining_monthly_tokens=6)
    )
    assert full["x-ratelimit-limit-tokens"] == "3"
    assert full["x-ratelimit-remaining-tokens"] == "4"
    assert full["x-ratelimit-remaining-monthly-tokens"] == "6"


@pytest.mark.parametrize(
    "allowance",
    [
        Allowance(),
        Allowance(limit_requests=60, remaining_requests=0, remaining_total_tokens=5),
        Allowance(1, 2, 3, 4, 5, 6, 7, reset_requests_ms=1500, reset_tokens_ms=61_250),
        Allowance(remaining_tokens=0, reset_tokens_ms=20),
        Allowance(limit_tokens=10**15, remaining_monthly_tokens=-1, reset_requests_ms=0),
    ],
)
def test_ratelimit_header_pairs_are_the_headers_as_bytes_in_order(allowance: Allowance) -> None:
    expected = [(k.encode(), v.encode()) for k, v in ratelimit_headers(allowance).items()]
    assert ratelimit_header_pairs(allowance) == expected


def test_retry_after_stays_within_one_window_under_clock_skew() -> None:
    now_ms = 1_000_500
    # a hit / bucket stamped 2 s ahead of our clock (a concurrent request, another replica)
    assert rpm_retry_after(now_ms + 2000, now_ms) == 60
    assert tpm_retry_after({1002: 100}, now_ms, tpm=100, incoming=1) == 60


@pytest.mark.parametrize(
    "now",
    [
        utc(2026, 11, 26, 23, 59, 59, microsecond=999_999),
        utc(2026, 11, 27),
        utc(2026, 12, 31, 23, 59, 59),
        utc(2027, 1, 1),
        utc(2028, 2, 29, 12),
        utc(1970, 1, 1),
        utc(1969, 12, 31, 23, 59, 59),
    ],
)
def test_period_ids_of_a_unix_time_match_the_datetime_ones(now: datetime) -> None:
    assert period_ids(now.timestamp()) == (day_id(now), month_id(now))


def test_reset_durations_are_spelled_as_openai_does() -> None:
    from neuronetz_gateway.domain.limits import format_duration

    assert [format_duration(ms) for ms in (0, 20, 1000, 1500, 59_999, 60_000, 61_250)] == [
        "0ms",
        "20ms",
        "1s",
        "1.5s",
        "59.999s",
        "1m0s",
        "1m1.25s",
    ]


def test_reset_is_when_the_binding_levels_oldest_entry_leaves_the_window() -> None:
    now_ms = 1_000_000
    allowance = compute_allowance(
        Limits(rpm=10, tpm=1000),
        Limits(rpm=100, tpm=500),
        LevelUsage(
            requests=9,
            window_tokens=100,
            oldest_hit_ms=now_ms - 45_000,
            oldest_token_second=(now_ms - 30_000) // 1000,
        ),
        LevelUsage(
            requests=9,
            window_tokens=400,
            oldest_hit_ms=now_ms - 1_000,
            oldest_token_second=(now_ms - 10_000) // 1000,
        ),
        now_ms,
    )
    # requests: the key binds (1 left of 10); tokens: the tenant binds (100 left of 500)
    assert allowance.reset_requests_ms == 15_000
    assert allowance.reset_tokens_ms == 50_000
    headers = ratelimit_headers(allowance)
    assert headers["x-ratelimit-reset-requests"] == "15s"
    assert headers["x-ratelimit-reset-tokens"] == "50s"
    # nothing counted yet: already at the initial state
    empty = compute_allowance(Limits(rpm=5), Limits(), LevelUsage(requests=0), LevelUsage(), now_ms)
    assert empty.reset_requests_ms == 0
