"""The key-info answer (``GET /v1/key``, ``GET /api/key``): what a key may still use. Pure.

Built from the signed identity alone (auth read the state in its decision
round trip), so the proxy asks nothing of Redis or Ollama. It names only the
presenting key and its own tenant: the key level counts this key's traffic,
the tenant level the tenant's total (which this key's traffic counts
against too); no other key or tenant appears.

Body (both surfaces; only the error dialect differs)::

    {"prefix", "tenant", "models" (null = all), "caps", "read_at",
     "limits": {"requests_per_minute" | "tokens_per_minute" | "concurrency" |
                "daily_tokens" | "monthly_tokens" | "total_tokens": {
        "limit", "used", "remaining", "resets_at", "resets_in_seconds",
        "level" ("key" | "tenant": the one that binds),
        "key": {"limit", "used", "remaining", "resets_at", "resets_in_seconds"} | null,
        "tenant": {...} | null}}}

``limit`` null = unlimited at both levels. ``resets_at`` is the next moment
``remaining`` grows by itself: rolling 60 s windows when the request or
tokens that bind leave the window, daily and monthly budgets at the next
UTC day / month; null for concurrency (a slot frees when a request ends) and
the total budget (it never resets), and for an empty window.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import msgspec

from neuronetz_gateway.domain.identity import Allowance, Identity, Limits, OptionCaps
from neuronetz_gateway.domain.key_state import KeyState, LevelState
from neuronetz_gateway.domain.limits import LevelUsage, compute_allowance, day_start, month_start

__all__ = ["KEY_INFO_ROUTES", "KeyInfo", "allowance_of", "key_info", "render_key_info"]

#: Route ids answered from the key's state instead of being admitted.
KEY_INFO_ROUTES = frozenset({"key", "v1.key"})

_LIMIT_NAMES = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrency",
    "daily_tokens",
    "monthly_tokens",
    "total_tokens",
)


class LevelFigures(msgspec.Struct, frozen=True):
    """One level's limit, what it used, what remains, and when that next grows."""

    limit: int
    used: int
    remaining: int
    resets_at: str | None
    resets_in_seconds: int | None


class LimitFigures(msgspec.Struct, frozen=True):
    """One limit: the binding level's figures, and both levels'."""

    limit: int | None
    used: int | None
    remaining: int | None
    resets_at: str | None
    resets_in_seconds: int | None
    level: str | None
    key: LevelFigures | None
    tenant: LevelFigures | None


class KeyInfo(msgspec.Struct, frozen=True):
    """The whole answer."""

    prefix: str
    tenant: str
    models: list[str] | None
    caps: OptionCaps
    read_at: str
    limits: dict[str, LimitFigures]


_UNLIMITED = LimitFigures(None, None, None, None, None, None, None, None)
_encoder = msgspec.json.Encoder()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _next_month(now: datetime) -> datetime:
    start = month_start(now)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def _level(
    limit: int | None, used: int | None, resets_at_ms: int | None, read_at_ms: int
) -> LevelFigures | None:
    if limit is None or used is None:
        return None
    resets_in = None
    if resets_at_ms is not None:
        resets_in = max(0, math.ceil((resets_at_ms - read_at_ms) / 1000))
    return LevelFigures(
        limit=limit,
        used=used,
        remaining=max(0, limit - used),
        resets_at=None if resets_at_ms is None else _iso(resets_at_ms),
        resets_in_seconds=resets_in,
    )


def _binding(key: LevelFigures | None, tenant: LevelFigures | None) -> LimitFigures:
    """The level with the least remaining binds; ties go to the smaller limit, then the key."""
    chosen: LevelFigures
    if key is None:
        if tenant is None:
            return _UNLIMITED
        chosen, level = tenant, "tenant"
    elif tenant is not None and (tenant.remaining, tenant.limit) < (key.remaining, key.limit):
        chosen, level = tenant, "tenant"
    else:
        chosen, level = key, "key"
    return LimitFigures(
        limit=chosen.limit,
        used=chosen.used,
        remaining=chosen.remaining,
        resets_at=chosen.resets_at,
        resets_in_seconds=chosen.resets_in_seconds,
        level=level,
        key=key,
        tenant=tenant,
    )


def _figures(limits: Limits, state: LevelState, read_at_ms: int) -> list[LevelFigures | None]:
    now = datetime.fromtimestamp(read_at_ms / 1000, UTC)
    next_day = int((day_start(now) + timedelta(days=1)).timestamp() * 1000)
    next_month = int(_next_month(now).timestamp() * 1000)
    requests, tokens = state.requests, state.tokens
    return [
        _level(
            limits.rpm,
            None if requests is None else requests.used,
            None if requests is None else requests.resets_at_ms,
            read_at_ms,
        ),
        _level(
            limits.tpm,
            None if tokens is None else tokens.used,
            None if tokens is None else tokens.resets_at_ms,
            read_at_ms,
        ),
        _level(limits.concurrency, state.concurrency, None, read_at_ms),
        _level(limits.daily_tokens, state.daily_tokens, next_day, read_at_ms),
        _level(limits.monthly_tokens, state.monthly_tokens, next_month, read_at_ms),
        _level(limits.total_tokens, state.total_tokens, None, read_at_ms),
    ]


def key_info(identity: Identity, state: KeyState) -> KeyInfo:
    """The answer for the key ``identity`` names, from the state auth read for it."""
    read_at = state.read_at_ms
    key = _figures(identity.key_limits, state.key, read_at)
    tenant = _figures(identity.tenant_limits, state.tenant, read_at)
    return KeyInfo(
        prefix=identity.key_prefix,
        tenant=identity.tenant_name,
        models=identity.models,
        caps=identity.caps,
        read_at=_iso(read_at),
        limits={name: _binding(k, t) for name, k, t in zip(_LIMIT_NAMES, key, tenant, strict=True)},
    )


def render_key_info(identity: Identity, state: KeyState) -> bytes:
    """:func:`key_info` as the JSON body."""
    return _encoder.encode(key_info(identity, state))


def _usage(state: LevelState) -> LevelUsage:
    return LevelUsage(
        requests=None if state.requests is None else state.requests.used,
        window_tokens=None if state.tokens is None else state.tokens.used,
        daily=state.daily_tokens,
        monthly=state.monthly_tokens,
        total=state.total_tokens,
    )


def allowance_of(state: KeyState, key_limits: Limits, tenant_limits: Limits) -> Allowance:
    """The ``x-ratelimit-*`` values of a state (this request itself counted nothing)."""
    return compute_allowance(key_limits, tenant_limits, _usage(state.key), _usage(state.tenant))
