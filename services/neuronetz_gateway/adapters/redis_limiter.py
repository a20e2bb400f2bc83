"""The rate limiter and budget engine: the only code that touches limit state in Redis.

Layout (scope-docs/SPEC.md section 5), every key hash-tagged per tenant so
each script touches one Redis Cluster slot::

    <prefix>:{t<tenant>}:rpm:k<key> | :rpm:t          ZSET hit -> ms      (61 s)
    <prefix>:{t<tenant>}:conc:k<key> | :conc:t        ZSET lease -> expiry ms
    <prefix>:{t<tenant>}:tpm:k<key> | :tpm:t          HASH second -> tokens (120 s)
    <prefix>:{t<tenant>}:bud:k<key>:d:<YYYYMMDD>      spent + reserved     (2 days)
    <prefix>:{t<tenant>}:bud:k<key>:m:<YYYYMM>                              (32 days)
    <prefix>:{t<tenant>}:bud:k<key>:total    (and bud:t:... for the tenant) (kept)

Each decision is one Lua script (``lua/*.lua``, EVALSHA with a reload on
NOSCRIPT) that checks key and tenant together and records only when
everything passes. A budget counter Redis has lost is rebuilt from the
Postgres ledger before the decision that needs it. The arithmetic (periods,
Retry-After, allowances) is in :mod:`neuronetz_gateway.domain.limits`.

Errors::

    Exception
    └── LimiterUnavailable   Redis (or the ledger, for a rebuild) could not be
                             asked in time: callers fail closed with a 503
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.postgres.store import LedgerTotals
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.limits import (
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
    rpm_retry_after,
    tpm_retry_after,
)

__all__ = ["LedgerSource", "Limiter", "LimiterUnavailable", "open_redis"]

_DAILY_BUDGET_TTL_S = 2 * 86_400
_MONTHLY_BUDGET_TTL_S = 32 * 86_400
_BUDGET_TTLS = (_DAILY_BUDGET_TTL_S, _MONTHLY_BUDGET_TTL_S, None)  # daily, monthly, total
_BUDGET_NAMES = ("daily_tokens", "monthly_tokens", "total_tokens")
_LEVELS = ("key", "tenant")

T = TypeVar("T")


def _lua(name: str) -> str:
    return files("neuronetz_gateway.adapters").joinpath("lua").joinpath(name).read_text("utf-8")


_DECIDE_LUA = _lua("decide.lua")
_SETTLE_LUA = _lua("settle.lua")
_LEASE_LUA = _lua("lease.lua")


class LimiterUnavailable(Exception):
    """Redis could not be asked: fail closed (503)."""


class LedgerSource(Protocol):
    """Where spent tokens are recorded for good (the Postgres ``usage_log``)."""

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        """Tokens spent today / this month / ever by a key (``key_id=None``: the tenant)."""
        ...


def open_redis(url: str, *, timeout_seconds: float = 1.0) -> aioredis.Redis:
    """A client suited to the limiter: short socket timeouts, no retry loops.

    redis-py's default retries with backoff would hold a request for seconds
    while Redis is down; the limiter wants to fail fast and let the caller
    answer 503. Broken connections are replaced on the next call, so the
    client recovers by itself when Redis comes back.
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    return client


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _usage(stats: Sequence[Any]) -> LevelUsage:
    """Script stats ``{requests, window_tokens, daily, monthly, total}``; -1 = not counted."""
    values = [None if int(v) < 0 else int(v) for v in stats]
    return LevelUsage(
        requests=values[0],
        window_tokens=values[1],
        daily=values[2],
        monthly=values[3],
        total=values[4],
    )


def _limit_args(limits: Limits) -> list[int]:
    return [
        -1 if v is None else v
        for v in (
            limits.rpm,
            limits.tpm,
            limits.concurrency,
            limits.daily_tokens,
            limits.monthly_tokens,
            limits.total_tokens,
        )
    ]


class _Keys:
    """Redis key names of one key and its tenant."""

    def __init__(self, prefix: str, tenant_id: int, key_id: int) -> None:
        self._base = f"{prefix}:{{t{tenant_id}}}"
        self._owners = (f"k{key_id}", "t")

    def _each(self, kind: str) -> list[str]:
        return [f"{self._base}:{kind}:{owner}" for owner in self._owners]

    def rpm(self) -> list[str]:
        return self._each("rpm")

    def conc(self) -> list[str]:
        return self._each("conc")

    def tpm(self) -> list[str]:
        return self._each("tpm")

    def budgets(self, at: datetime) -> list[tuple[str, str, str]]:
        """Per level: (daily, monthly, total) counter names for ``at``'s periods."""
        day, month = day_id(at), month_id(at)
        return [
            (
                f"{self._base}:bud:{owner}:d:{day}",
                f"{self._base}:bud:{owner}:m:{month}",
                f"{self._base}:bud:{owner}:total",
            )
            for owner in self._owners
        ]


class Limiter:
    """RPM / TPM / concurrency limits and token budgets, per key and per tenant, in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "nz",
        ledger: LedgerSource,
        clock: Callable[[], float] = time.time,
        lease_ttl_seconds: int = 60,
        timeout_seconds: float = 1.0,
        ledger_timeout_seconds: float = 5.0,
    ) -> None:
        if lease_ttl_seconds <= 0 or timeout_seconds <= 0 or ledger_timeout_seconds <= 0:
            raise ValueError("lease TTL and timeouts must be positive")
        self._redis = redis
        self._prefix = prefix
        self._ledger = ledger
        self._clock = clock
        self._lease_ttl_ms = int(lease_ttl_seconds * 1000)
        self._timeout = timeout_seconds
        self._ledger_timeout = ledger_timeout_seconds
        self._ledger_flights: dict[
            tuple[int, int | None, str, str], asyncio.Future[LedgerTotals]
        ] = {}
        self._decide_script = redis.register_script(_DECIDE_LUA)
        self._settle_script = redis.register_script(_SETTLE_LUA)
        self._lease_script = redis.register_script(_LEASE_LUA)

    # public API -----------------------------------------------------------------

    async def admit(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
    ) -> Decision:
        """Count one request against RPM and take a concurrency lease, if nothing refuses.

        Also refuses when the TPM window or a budget is already spent. The
        returned ``lease_id`` (set when a concurrency limit applies) must be
        renewed while the request runs and released when it ends.
        """
        needs_lease = key_limits.concurrency is not None or tenant_limits.concurrency is not None
        lease_id = uuid.uuid4().hex if needs_lease else None
        return await self._decide(
            "admit", tenant_id, key_id, key_limits, tenant_limits, request_id, 0, lease_id
        )

    async def reserve(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
        tokens: int,
    ) -> Decision:
        """Add ``tokens`` to both levels' budgets and TPM window if all stay within limits."""
        if tokens < 0:
            raise ValueError("tokens to reserve must not be negative")
        return await self._decide(
            "reserve", tenant_id, key_id, key_limits, tenant_limits, request_id, tokens, None
        )

    async def settle(
        self,
        *,
        tenant_id: int,
        key_id: int,
        reserved: int,
        actual: int,
        reserved_at: float,
        key_limits: Limits | None = None,
        tenant_limits: Limits | None = None,
    ) -> Allowance:
        """Correct a reservation to the real count (``actual - reserved``, may be negative).

        Adjusts the budget counters of ``reserved_at``'s periods and its TPM
        bucket (if still in the window). Returns the remaining allowance; pass
        the limits to get it, without them every value is ``None``.
        """
        now_ms = self._now_ms()
        now_s = now_ms // 1000
        keys = _Keys(self._prefix, tenant_id, key_id)
        reserved_budgets = keys.budgets(datetime.fromtimestamp(reserved_at, UTC))
        current_budgets = keys.budgets(datetime.fromtimestamp(now_ms / 1000, UTC))
        script_keys: list[str] = []
        for level in range(2):
            d_then, m_then, total = reserved_budgets[level]
            d_now, m_now, _ = current_budgets[level]
            script_keys += [
                keys.rpm()[level],
                keys.tpm()[level],
                d_then,
                m_then,
                total,
                d_now,
                m_now,
            ]
        args = [actual - reserved, int(reserved_at), now_ms, now_s]
        reply = await self._call(lambda: self._settle_script(keys=script_keys, args=args))
        return compute_allowance(
            key_limits or Limits(),
            tenant_limits or Limits(),
            _usage(reply[0]),
            _usage(reply[1]),
        )

    async def renew_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None:
        """Extend a running request's concurrency lease by the lease TTL from now."""
        await self._lease("renew", tenant_id, key_id, lease_id)

    async def release_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None:
        """Give the concurrency slot back (idempotent)."""
        await self._lease("release", tenant_id, key_id, lease_id)

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout (for readiness probes); never raises."""
        try:
            return bool(await self._call(self._redis.ping))
        except LimiterUnavailable:
            return False

    # internals --------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call, bounded in time; any failure becomes LimiterUnavailable."""
        try:
            async with asyncio.timeout(self._timeout):
                return await call()
        except TimeoutError:
            raise LimiterUnavailable("redis did not answer in time") from None
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"redis failed: {type(exc).__name__}: {exc}") from exc

    async def _lease(self, action: str, tenant_id: int, key_id: int, lease_id: str) -> None:
        expiry_ms = self._now_ms() + self._lease_ttl_ms
        keys = _Keys(self._prefix, tenant_id, key_id).conc()
        args: list[int | str] = [action, lease_id, expiry_ms, self._lease_ttl_ms + 1000]
        await self._call(lambda: self._lease_script(keys=keys, args=args))

    async def _decide(
        self,
        mode: str,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
        tokens: int,
        lease_id: str | None,
    ) -> Decision:
        now_ms = self._now_ms()
        now_s = now_ms // 1000
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        keys = _Keys(self._prefix, tenant_id, key_id)
        budgets = keys.budgets(now)
        script_keys: list[str] = []
        for level in range(2):
            script_keys += [keys.rpm()[level], keys.conc()[level], keys.tpm()[level]]
            script_keys += budgets[level]
        args: list[int | str] = [
            mode,
            now_ms,
            now_s,
            # unique per hit, so hits with one request id or in one millisecond all count
            f"{request_id}:{secrets.token_hex(6)}",
            lease_id or "",
            now_ms + self._lease_ttl_ms,
            self._lease_ttl_ms + 1000,
            tokens,
            *_limit_args(key_limits),
            *_limit_args(tenant_limits),
        ]
        reply = await self._call(lambda: self._decide_script(keys=script_keys, args=args))
        if _text(reply[0]) == "missing":
            missing = [_text(m) for m in reply[1]]
            await self._rebuild_budgets(tenant_id, key_id, now, budgets, missing)
            reply = await self._call(lambda: self._decide_script(keys=script_keys, args=args))
            if _text(reply[0]) == "missing":
                # evicted again at once: deciding without it would not be a check
                raise LimiterUnavailable("budget counters could not be rebuilt")
        status, key_stats, tenant_stats, raw_refusals = reply
        allowance = compute_allowance(
            key_limits, tenant_limits, _usage(key_stats), _usage(tenant_stats)
        )
        if _text(status) == "ok":
            return decide((), allowance, lease_id)
        need = 1 if mode == "admit" else tokens
        limits = {"key": key_limits, "tenant": tenant_limits}
        refusals = [self._refusal(raw, limits, now_ms, now, need) for raw in raw_refusals]
        return decide(refusals, allowance)

    @staticmethod
    def _refusal(
        raw: Sequence[Any], limits: dict[str, Limits], now_ms: int, now: datetime, need: int
    ) -> Refusal:
        reason, level = _text(raw[0]), _text(raw[1])
        if reason == "rpm":
            retry_after = rpm_retry_after(int(raw[2]), now_ms)
        elif reason == "concurrency":
            retry_after = 1  # leases end at unknown times; ask again soon
        elif reason == "tpm":
            buckets = {int(raw[i]): int(raw[i + 1]) for i in range(2, len(raw), 2)}
            # the script checks only set limits, so tpm is never None here
            retry_after = tpm_retry_after(buckets, now_ms, limits[level].tpm or 0, need)
        else:
            retry_after = budget_retry_after(reason, now)
        return Refusal(reason=reason, level=level, retry_after=retry_after)

    async def _rebuild_budgets(
        self,
        tenant_id: int,
        key_id: int,
        now: datetime,
        budgets: list[tuple[str, str, str]],
        missing: list[str],
    ) -> None:
        """Write the missing counters from the ledger with SET NX (a racing writer wins)."""
        wanted = {tuple(m.split(":", 1)) for m in missing}
        levels = [i for i, level in enumerate(_LEVELS) if any(w[0] == level for w in wanted)]

        try:
            async with asyncio.timeout(self._ledger_timeout):
                found = await asyncio.gather(
                    *(
                        self._ledger_totals(tenant_id, key_id if lv == 0 else None, now)
                        for lv in levels
                    )
                )
        except Exception as exc:
            # the budget cannot be checked without its counter: fail closed
            raise LimiterUnavailable(f"ledger unavailable: {type(exc).__name__}") from exc

        pipe = self._redis.pipeline(transaction=False)
        for level, ledger in zip(levels, found, strict=True):
            values = (ledger.daily, ledger.monthly, ledger.total)
            for b, name in enumerate(_BUDGET_NAMES):
                if (_LEVELS[level], name) in wanted:
                    pipe.set(budgets[level][b], values[b], nx=True, ex=_BUDGET_TTLS[b])
        await self._call(pipe.execute)

    async def _ledger_totals(
        self, tenant_id: int, key_id: int | None, now: datetime
    ) -> LedgerTotals:
        """One ledger query per level and period at a time, shared by concurrent callers.

        After a Redis restart every request of a busy tenant finds its counters
        missing at once; they wait for one query instead of each sending one.
        """
        flight = (tenant_id, key_id, day_id(now), month_id(now))
        task = self._ledger_flights.get(flight)
        if task is None:
            task = asyncio.ensure_future(
                self._ledger.ledger_totals(
                    tenant_id=tenant_id,
                    key_id=key_id,
                    day_start=day_start(now),
                    month_start=month_start(now),
                )
            )
            self._ledger_flights[flight] = task
            task.add_done_callback(lambda done: self._land(flight, done))
        # shielded: one caller giving up (timeout, disconnect) must not cancel the others'
        return await asyncio.shield(task)

    def _land(self, flight: tuple[int, int | None, str, str], done: asyncio.Future[Any]) -> None:
        self._ledger_flights.pop(flight, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a failure nobody awaited is not logged as lost
