"""Limit and budget arithmetic: periods, Retry-After, decisions, allowances. Pure.

The Redis adapter (:mod:`neuronetz_gateway.adapters.redis_limiter`) records
and counts; everything that turns those counts into an answer lives here so
it can be tested without a clock or a server:

- UTC calendar periods (``day_id``, ``month_id``) and the seconds until the
  next one (daily / monthly budgets reset at UTC midnight / month start);
- Retry-After per limit (scope-docs/SPEC.md section 5), always whole
  seconds >= 1;
- :class:`Decision` (what ``admit`` / ``reserve`` answer) and
  :class:`Refusal` (one limit that said no);
- the allowance (tighter of key and tenant) and its ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import msgspec

from neuronetz_gateway.domain.identity import Allowance, Limits

__all__ = [
    "BUDGET_REASONS",
    "LEVELS",
    "RATE_REASONS",
    "TOTAL_BUDGET_RETRY_AFTER",
    "WINDOW_MS",
    "WINDOW_SECONDS",
    "Decision",
    "LevelUsage",
    "Refusal",
    "budget_retry_after",
    "compute_allowance",
    "day_id",
    "day_start",
    "decide",
    "format_duration",
    "month_id",
    "month_start",
    "period_ids",
    "ratelimit_header_pairs",
    "ratelimit_headers",
    "rpm_retry_after",
    "seconds_until_next_day",
    "seconds_until_next_month",
    "tpm_retry_after",
    "tpm_window_seconds",
]

WINDOW_SECONDS = 60
WINDOW_MS = WINDOW_SECONDS * 1000
# The total budget never resets by itself; a day is the honest "not soon".
TOTAL_BUDGET_RETRY_AFTER = 86_400
RATE_REASONS = ("rpm", "concurrency", "tpm")
BUDGET_REASONS = ("daily_tokens", "monthly_tokens", "total_tokens")
LEVELS = ("key", "tenant")


# periods --------------------------------------------------------------------


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("naive datetime: periods are UTC calendar periods, pass an aware time")
    return now.astimezone(UTC)


def day_start(now: datetime) -> datetime:
    """Midnight UTC that starts ``now``'s day."""
    u = _utc(now)
    return datetime(u.year, u.month, u.day, tzinfo=UTC)


def month_start(now: datetime) -> datetime:
    """Midnight UTC of the first day of ``now``'s month."""
    u = _utc(now)
    return datetime(u.year, u.month, 1, tzinfo=UTC)


def day_id(now: datetime) -> str:
    """``YYYYMMDD`` of the UTC day (the daily budget counter's suffix)."""
    return _utc(now).strftime("%Y%m%d")


def month_id(now: datetime) -> str:
    """``YYYYMM`` of the UTC month (the monthly budget counter's suffix)."""
    return _utc(now).strftime("%Y%m")


_EPOCH = date(1970, 1, 1)


@lru_cache(maxsize=4)
def _ids_of_day(day_number: int) -> tuple[str, str]:
    d = _EPOCH + timedelta(days=day_number)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}", f"{d.year:04d}{d.month:02d}"


def period_ids(unix_seconds: float) -> tuple[str, str]:
    """``(day_id, month_id)`` of a unix time, as :func:`day_id` / :func:`month_id` spell them.

    For the hot path: no datetime is built, and the strings are computed
    once per UTC day (unix time has no leap seconds: a day is 86400 s).
    """
    return _ids_of_day(int(unix_seconds // 86_400))


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def seconds_until_next_day(now: datetime) -> int:
    """Whole seconds (>= 1, rounded up) until the next UTC midnight."""
    nxt = day_start(now) + timedelta(days=1)
    return _whole_seconds((nxt - _utc(now)).total_seconds())


def seconds_until_next_month(now: datetime) -> int:
    """Whole seconds (>= 1, rounded up) until the first of the next UTC month."""
    start = month_start(now)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return _whole_seconds((nxt - _utc(now)).total_seconds())


# Retry-After ------------------------------------------------------------------


def rpm_retry_after(leaving_hit_ms: int, now_ms: int) -> int:
    """Seconds until the hit at ``leaving_hit_ms`` leaves the 60 s window.

    The hit to wait for is the one whose departure brings the count below the
    limit (the oldest one when the window holds exactly ``limit`` hits). A hit
    stamped a few ms ahead of ``now_ms`` (a concurrent request that read the
    clock later, another replica's clock) still waits at most one window.
    """
    return min(WINDOW_SECONDS, _whole_seconds((leaving_hit_ms + WINDOW_MS - now_ms) / 1000))


def tpm_window_seconds(now_ms: int) -> range:
    """The unix seconds whose buckets make up the TPM window at ``now_ms`` (60 of them)."""
    now_s = now_ms // 1000
    return range(now_s - WINDOW_SECONDS + 1, now_s + 1)


def tpm_retry_after(buckets: Mapping[int, int], now_ms: int, tpm: int, incoming: int) -> int:
    """Seconds until ``incoming`` more tokens fit under ``tpm`` as old buckets expire.

    ``buckets`` maps unix second -> tokens within the window. The bucket of
    second ``s`` leaves the window at ``s + 60``. ``admit`` asks with
    ``incoming=1`` (the window must be below the limit), ``reserve`` with the
    request's tokens. A request larger than the whole limit never fits; it
    gets the full window length, as does a wait stretched past it by a bucket
    stamped ahead of ``now_ms`` (clock skew between replicas).
    """
    if incoming > tpm:
        return WINDOW_SECONDS
    oldest = tpm_window_seconds(now_ms)[0]
    # buckets ahead of now (skew) are in the window too: the script counted them
    live = sorted((s, n) for s, n in buckets.items() if s >= oldest)
    left = sum(n for _, n in live)
    if left + incoming <= tpm:
        return 1  # fits already (the window moved since the check): shortest wait
    for second, tokens in live:
        left -= tokens
        if left + incoming <= tpm:
            wait = ((second + WINDOW_SECONDS) * 1000 - now_ms) / 1000
            return min(WINDOW_SECONDS, _whole_seconds(wait))
    return WINDOW_SECONDS  # pragma: no cover - an empty window fits when incoming <= tpm


def budget_retry_after(reason: str, now: datetime) -> int:
    """Seconds until the budget named by ``reason`` resets (total: a day, it never does)."""
    if reason == "daily_tokens":
        return seconds_until_next_day(now)
    if reason == "monthly_tokens":
        return seconds_until_next_month(now)
    if reason == "total_tokens":
        return TOTAL_BUDGET_RETRY_AFTER
    raise ValueError(f"not a budget: {reason!r}")


# decisions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """One limit that refused: which, at which level, and how long to wait."""

    reason: str  # one of RATE_REASONS or BUDGET_REASONS
    level: str  # "key" | "tenant"
    retry_after: int  # whole seconds >= 1


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of ``admit`` / ``reserve``."""

    allowed: bool
    reason: str | None = None  # "rpm" | "concurrency" | "tpm" | "*_tokens" budgets
    level: str | None = None  # "key" | "tenant"
    retry_after: int = 0  # whole seconds >= 1 when refused
    lease_id: str | None = None  # set by admit when a concurrency limit applies
    # set by reserve when it recorded tokens: settle must be told it
    reservation_id: str | None = None
    # remaining values for the x-ratelimit-* headers (tighter of key and tenant)
    allowance: Allowance = field(default_factory=Allowance)
    # what the tenant level has used (admit / reserve), for the budget-burn gauges
    tenant_usage: LevelUsage | None = field(default=None, compare=False)

    @property
    def error_code(self) -> str | None:
        """``rate_limit_exceeded`` / ``budget_exceeded`` for a refusal, else ``None``."""
        if self.allowed or self.reason is None:
            return None
        return "budget_exceeded" if self.reason in BUDGET_REASONS else "rate_limit_exceeded"


def decide(
    refusals: Iterable[Refusal],
    allowance: Allowance,
    lease_id: str | None = None,
    tenant_usage: LevelUsage | None = None,
) -> Decision:
    """Allowed when nothing refused; else the refusal with the longest wait.

    Every refusing limit must clear before the request can succeed, so the
    longest Retry-After is the honest one (and names the limit that binds).
    """
    worst: Refusal | None = None
    for refusal in refusals:
        if worst is None or refusal.retry_after > worst.retry_after:
            worst = refusal
    if worst is None:
        return Decision(
            allowed=True, lease_id=lease_id, allowance=allowance, tenant_usage=tenant_usage
        )
    return Decision(
        allowed=False,
        reason=worst.reason,
        level=worst.level,
        retry_after=max(1, worst.retry_after),
        allowance=allowance,
        tenant_usage=tenant_usage,
    )


# allowance --------------------------------------------------------------------


class LevelUsage(msgspec.Struct, frozen=True):
    """What one level (key or tenant) has used; ``None`` = not counted (unlimited/unknown)."""

    requests: int | None = None  # hits in the RPM window
    window_tokens: int | None = None  # tokens in the TPM window
    daily: int | None = None  # budget counters (spent + reserved)
    monthly: int | None = None
    total: int | None = None
    # when the remaining values next go up: the oldest hit in the RPM window (unix ms)
    # and the oldest second with tokens in the TPM window (unix s); None = none counted
    oldest_hit_ms: int | None = None
    oldest_token_second: int | None = None


def _tightest(
    key_limit: int | None, key_used: int | None, tenant_limit: int | None, tenant_used: int | None
) -> tuple[int | None, int | None]:
    """(limit, remaining) of the level with the least remaining, among those counted.

    Ties go to the smaller limit. Written out (no generators, no tuples
    compared): it runs five times per decision.
    """
    if key_limit is not None and key_used is not None:
        key_left = key_limit - key_used
        if key_left < 0:  # noqa: PLR1730 - max() is a call, this runs 5x per decision
            key_left = 0
        if tenant_limit is None or tenant_used is None:
            return key_limit, key_left
        tenant_left = tenant_limit - tenant_used
        if tenant_left < 0:  # noqa: PLR1730 - as above
            tenant_left = 0
        if tenant_left < key_left or (tenant_left == key_left and tenant_limit < key_limit):
            return tenant_limit, tenant_left
        return key_limit, key_left
    if tenant_limit is not None and tenant_used is not None:
        tenant_left = tenant_limit - tenant_used
        return tenant_limit, tenant_left if tenant_left > 0 else 0
    return None, None


def compute_allowance(
    key_limits: Limits,
    tenant_limits: Limits,
    key: LevelUsage,
    tenant: LevelUsage,
    now_ms: int | None = None,
) -> Allowance:
    """Remaining allowances, the tighter of key and tenant; ``None`` where unlimited.

    With ``now_ms``, also when the binding level's requests / tokens next
    free up (OpenAI's ``x-ratelimit-reset-*``): the oldest counted hit or
    token bucket leaving the 60 s window; 0 when nothing is counted.
    """
    k, t = key_limits, tenant_limits
    limit_requests, remaining_requests = _tightest(k.rpm, key.requests, t.rpm, tenant.requests)
    limit_tokens, remaining_tokens = _tightest(
        k.tpm, key.window_tokens, t.tpm, tenant.window_tokens
    )
    _, daily = _tightest(k.daily_tokens, key.daily, t.daily_tokens, tenant.daily)
    _, monthly = _tightest(k.monthly_tokens, key.monthly, t.monthly_tokens, tenant.monthly)
    _, total = _tightest(k.total_tokens, key.total, t.total_tokens, tenant.total)
    reset_requests = reset_tokens = None
    if now_ms is not None:
        if limit_requests is not None:
            binding = _binding(k.rpm, key.requests, key, tenant, remaining_requests)
            reset_requests = _reset_ms(binding.oldest_hit_ms, now_ms)
        if limit_tokens is not None:
            binding = _binding(k.tpm, key.window_tokens, key, tenant, remaining_tokens)
            oldest = binding.oldest_token_second
            reset_tokens = _reset_ms(None if oldest is None else oldest * 1000, now_ms)
    return Allowance(
        limit_requests=limit_requests,
        remaining_requests=remaining_requests,
        limit_tokens=limit_tokens,
        remaining_tokens=remaining_tokens,
        remaining_daily_tokens=daily,
        remaining_monthly_tokens=monthly,
        remaining_total_tokens=total,
        reset_requests_ms=reset_requests,
        reset_tokens_ms=reset_tokens,
    )


def _binding(
    key_limit: int | None,
    key_used: int | None,
    key: LevelUsage,
    tenant: LevelUsage,
    remaining: int | None,
) -> LevelUsage:
    """The level :func:`_tightest` chose: the key's when its remainder is the one reported."""
    if key_limit is not None and key_used is not None and max(0, key_limit - key_used) == remaining:
        return key
    return tenant


def _reset_ms(oldest_ms: int | None, now_ms: int) -> int:
    """Milliseconds until a window entry stamped ``oldest_ms`` leaves the 60 s window."""
    if oldest_ms is None:
        return 0
    return max(0, min(WINDOW_MS, oldest_ms + WINDOW_MS - now_ms))


def format_duration(ms: int) -> str:
    """A duration as OpenAI's reset headers spell it (Go's style): ``20ms``, ``1.5s``, ``1m0s``."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


_HEADERS = (
    ("x-ratelimit-limit-requests", "limit_requests"),
    ("x-ratelimit-remaining-requests", "remaining_requests"),
    ("x-ratelimit-limit-tokens", "limit_tokens"),
    ("x-ratelimit-remaining-tokens", "remaining_tokens"),
    ("x-ratelimit-remaining-daily-tokens", "remaining_daily_tokens"),
    ("x-ratelimit-remaining-monthly-tokens", "remaining_monthly_tokens"),
    ("x-ratelimit-remaining-total-tokens", "remaining_total_tokens"),
)


def ratelimit_headers(allowance: Allowance) -> dict[str, str]:
    """The ``x-ratelimit-*`` response headers for the values that are known."""
    headers: dict[str, str] = {}
    for header, attr in _HEADERS:
        value = getattr(allowance, attr)
        if value is not None:
            headers[header] = str(value)
    if allowance.reset_requests_ms is not None:
        headers["x-ratelimit-reset-requests"] = format_duration(allowance.reset_requests_ms)
    if allowance.reset_tokens_ms is not None:
        headers["x-ratelimit-reset-tokens"] = format_duration(allowance.reset_tokens_ms)
    return headers


def ratelimit_header_pairs(allowance: Allowance) -> list[tuple[bytes, bytes]]:
    """:func:`ratelimit_headers` as raw ``(name, value)`` pairs, in the same order.

    What ASGI responses carry; built without the dict, the attribute lookups
    by name and the encoding of every name (a third of the CPU, once per
    proxied request).
    """
    a = allowance
    pairs: list[tuple[bytes, bytes]] = []
    if a.limit_requests is not None:
        pairs.append((b"x-ratelimit-limit-requests", b"%d" % a.limit_requests))
    if a.remaining_requests is not None:
        pairs.append((b"x-ratelimit-remaining-requests", b"%d" % a.remaining_requests))
    if a.limit_tokens is not None:
        pairs.append((b"x-ratelimit-limit-tokens", b"%d" % a.limit_tokens))
    if a.remaining_tokens is not None:
        pairs.append((b"x-ratelimit-remaining-tokens", b"%d" % a.remaining_tokens))
    if a.remaining_daily_tokens is not None:
        pairs.append((b"x-ratelimit-remaining-daily-tokens", b"%d" % a.remaining_daily_tokens))
    if a.remaining_monthly_tokens is not None:
        pairs.append((b"x-ratelimit-remaining-monthly-tokens", b"%d" % a.remaining_monthly_tokens))
    if a.remaining_total_tokens is not None:
        pairs.append((b"x-ratelimit-remaining-total-tokens", b"%d" % a.remaining_total_tokens))
    if a.reset_requests_ms is not None:
        pairs.append((b"x-ratelimit-reset-requests", format_duration(a.reset_requests_ms).encode()))
    if a.reset_tokens_ms is not None:
        pairs.append((b"x-ratelimit-reset-tokens", format_duration(a.reset_tokens_ms).encode()))
    return pairs
