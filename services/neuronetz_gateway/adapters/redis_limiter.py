"""The rate limiter and budget engine: the only code that touches limit state in Redis.

Layout (scope-docs/SPEC.md section 5), every key hash-tagged per tenant so
each script touches one Redis Cluster slot::

    <prefix>:{t<tenant>}:rpm:k<key> | :rpm:t          ZSET hit -> ms      (61 s)
    <prefix>:{t<tenant>}:conc:k<key> | :conc:t        ZSET lease -> expiry ms
    <prefix>:{t<tenant>}:tpm:k<key> | :tpm:t          HASH second -> tokens (120 s)
    <prefix>:{t<tenant>}:bud:k<key>:d:<YYYYMMDD>      spent + reserved     (2 days)
    <prefix>:{t<tenant>}:bud:k<key>:m:<YYYYMM>                              (32 days)
    <prefix>:{t<tenant>}:bud:k<key>:total    (and bud:t:... for the tenant) (kept)
    <prefix>:{t<tenant>}:used:<request id>    a signed identity's single-use marker
                                              (until the identity expires, + 1 s)
    <prefix>:{t<tenant>}:resv                 ZSET reservation id -> expiry ms
    <prefix>:{t<tenant>}:resv:rec             HASH reservation id -> amount and the
                                              counters it was added to (until swept
                                              after its expiry); once settled, the mark
                                              "settled" (swept a reservation TTL later)

Each decision is one Lua script (``lua/*.lua``, EVALSHA with a reload on
NOSCRIPT) that checks key and tenant together and records only when
everything passes. A budget counter Redis has lost is rebuilt from the
Postgres ledger before the decision that needs it. The arithmetic (periods,
Retry-After, allowances) is in :mod:`neuronetz_gateway.domain.limits`.

Errors::

    Exception
    ├── LimiterUnavailable   Redis (or the ledger, for a rebuild) could not be
    │                        asked in time: callers fail closed with a 503
    └── IdentityReplayed     the signed identity was used before (the proxy: 401)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from neuronetz_gateway.adapters.postgres.store import LedgerTotals
from neuronetz_gateway.adapters.redis_client import RedisClient
from neuronetz_gateway.adapters.redis_commands import RedisCommands, command_channel
from neuronetz_gateway.adapters.redis_pipeline import PackedKeys, PipelinedRedis, RedisArg
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.key_state import KeyState, LevelState, WindowState, window_reset_ms
from neuronetz_gateway.domain.limits import (
    WINDOW_MS,
    Decision,
    LevelUsage,
    Refusal,
    budget_retry_after,
    compute_allowance,
    day_start,
    decide,
    month_start,
    period_ids,
    rpm_retry_after,
    tpm_retry_after,
)

__all__ = ["IdentityReplayed", "LedgerSource", "Limiter", "LimiterUnavailable", "limiter_script"]

_DAILY_BUDGET_TTL_S = 2 * 86_400
_MONTHLY_BUDGET_TTL_S = 32 * 86_400
_BUDGET_TTLS = (_DAILY_BUDGET_TTL_S, _MONTHLY_BUDGET_TTL_S, None)  # daily, monthly, total
_BUDGET_NAMES = ("daily_tokens", "monthly_tokens", "total_tokens")
_LEVELS = ("key", "tenant")
#: A single-use marker outlives its identity by this much (clock steps between replicas).
_MARKER_GRACE_MS = 1000

#: How long an unsettled reservation holds its tokens when the caller does not say
#: (the proxy passes its own bound: see ``proxy.app.reservation_ttl_seconds``).
DEFAULT_RESERVATION_TTL_SECONDS = 720.0

T = TypeVar("T")


def _lua(name: str) -> str:
    return files("neuronetz_gateway.adapters").joinpath("lua").joinpath(name).read_text("utf-8")


class _Script:
    """A Lua script's text and the SHA-1 Redis knows it by."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id


def limiter_script(name: str) -> str:
    """The text Redis runs for ``lua/<name>``: shared snippets first, then the script.

    ``decide.lua`` and ``state.lua`` both sum the TPM window; ``tpm_window.lua``
    defines that once and is joined in front of each here, at load time.
    """
    snippets = ("tpm_window.lua",) if name in {"decide.lua", "state.lua"} else ()
    return "".join(_lua(snippet) for snippet in snippets) + _lua(name)


_DECIDE = _Script(limiter_script("decide.lua"))
_SETTLE = _Script(limiter_script("settle.lua"))
_LEASE = _Script(limiter_script("lease.lua"))
_STATE = _Script(limiter_script("state.lua"))
_REBUILD = _Script(limiter_script("rebuild.lua"))
#: Beside a budget counter rebuilt from the ledger: when that ledger was read (ms).
REBUILT_MARK = ":rb"
#: A rebuilt mark outlives the last settle retry it can serve (they stop at the TTL).
_REBUILT_MARK_SLACK_MS = 60_000

#: Key-name sets kept per (tenant, key); a busy process sees few distinct keys.
_MAX_CACHED_KEYS = 4096
#: Decide / state ARGV of limits, per (key limits, tenant limits): one pair per key.
_MAX_CACHED_LIMITS = 4096
_LIMIT_ARGV: dict[tuple[Limits, Limits], tuple[int, ...]] = {}


class LimiterUnavailable(Exception):
    """Redis could not be asked: fail closed (503)."""


class IdentityReplayed(Exception):
    """The signed identity was already used once: a replay (the proxy answers 401)."""


class LedgerSource(Protocol):
    """Where spent tokens are recorded for good (the Postgres ``usage_log``)."""

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        """Tokens spent today / this month / ever by a key (``key_id=None``: the tenant)."""
        ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _usage(stats: Sequence[Any]) -> LevelUsage:
    """Script stats ``{requests, window_tokens, daily, monthly, total[, oldest hit ms, oldest
    token second]}`` (decide sends all seven, settle the first five); -1 = not counted."""
    requests, window, daily = int(stats[0]), int(stats[1]), int(stats[2])
    monthly, total = int(stats[3]), int(stats[4])
    if len(stats) >= 7:
        oldest_hit, oldest_second = int(stats[5]), int(stats[6])
    else:
        oldest_hit = oldest_second = -1
    # positional, in LevelUsage's field order
    return LevelUsage(
        None if requests < 0 else requests,
        None if window < 0 else window,
        None if daily < 0 else daily,
        None if monthly < 0 else monthly,
        None if total < 0 else total,
        None if oldest_hit < 0 else oldest_hit,
        None if oldest_second < 0 else oldest_second,
    )


def _level_state(raw: Sequence[Any], limits: Limits) -> LevelState:
    """``state.lua``'s figures of one level; -1 = that limit is not set."""
    requests, hit_ms, concurrency, window, daily, monthly, total = (int(v) for v in raw[:7])
    buckets = raw[7]
    tokens = requests_state = None
    if requests >= 0:
        requests_state = WindowState(requests, None if hit_ms < 0 else hit_ms + WINDOW_MS)
    if window >= 0:
        entries = [(int(buckets[i]) * 1000, int(buckets[i + 1])) for i in range(0, len(buckets), 2)]
        tokens = WindowState(window, window_reset_ms(entries, limits.tpm or 0))
    return LevelState(
        requests=requests_state if requests >= 0 else None,
        tokens=tokens,
        concurrency=None if concurrency < 0 else concurrency,
        daily_tokens=None if daily < 0 else daily,
        monthly_tokens=None if monthly < 0 else monthly,
        total_tokens=None if total < 0 else total,
    )


def _limit_args(limits: Limits) -> tuple[int, ...]:
    return (
        -1 if limits.rpm is None else limits.rpm,
        -1 if limits.tpm is None else limits.tpm,
        -1 if limits.concurrency is None else limits.concurrency,
        -1 if limits.daily_tokens is None else limits.daily_tokens,
        -1 if limits.monthly_tokens is None else limits.monthly_tokens,
        -1 if limits.total_tokens is None else limits.total_tokens,
    )


def _limit_argv(key_limits: Limits, tenant_limits: Limits) -> tuple[int, ...]:
    """Both levels' :func:`_limit_args`, kept per pair of limits (they rarely change).

    Keyed by value (``Limits`` is frozen and hashable): new limits, even in
    the same objects' place, get their own entry. Bounded: cleared when full.
    """
    pair = (key_limits, tenant_limits)
    argv = _LIMIT_ARGV.get(pair)
    if argv is None:
        if len(_LIMIT_ARGV) >= _MAX_CACHED_LIMITS:
            _LIMIT_ARGV.clear()  # cheap to rebuild; a bound, not an LRU
        argv = _LIMIT_ARGV[pair] = (*_limit_args(key_limits), *_limit_args(tenant_limits))
    return argv


class _Keys:
    """Redis key names of one key and its tenant, built once per (tenant, key).

    The script key lists depend on the UTC day and month too; the last one
    built is kept, so a decision normally builds no string at all.
    """

    __slots__ = ("_budget", "_decide", "_settle", "conc", "resv", "rpm", "tpm")

    def __init__(self, prefix: str, tenant_id: int, key_id: int) -> None:
        base = f"{prefix}:{{t{tenant_id}}}"
        owners = (f"k{key_id}", "t")
        self.rpm = tuple(f"{base}:rpm:{owner}" for owner in owners)
        self.conc = tuple(f"{base}:conc:{owner}" for owner in owners)
        self.tpm = tuple(f"{base}:tpm:{owner}" for owner in owners)
        self._budget = tuple(f"{base}:bud:{owner}" for owner in owners)
        self.resv = (f"{base}:resv", f"{base}:resv:rec")
        self._decide: tuple[str, str, list[str]] = ("", "", [])
        self._settle: tuple[tuple[str, str, str, str], list[str]] = (("", "", "", ""), [])

    def budgets(self, day: str, month: str) -> list[tuple[str, str, str]]:
        """Per level: (daily, monthly, total) counter names for that day and month."""
        return [(f"{b}:d:{day}", f"{b}:m:{month}", f"{b}:total") for b in self._budget]

    def decide_keys(self, day: str, month: str) -> list[str]:
        """``decide.lua``'s KEYS: per level rpm, conc, tpm, daily, monthly, total; then the
        reservation ZSET and HASH."""
        cached_day, cached_month, keys = self._decide
        if cached_day == day and cached_month == month:
            return keys
        keys = []
        for level, budgets in enumerate(self.budgets(day, month)):
            keys += [self.rpm[level], self.conc[level], self.tpm[level], *budgets]
        keys += self.resv
        keys = PackedKeys(keys)
        self._decide = (day, month, keys)
        return keys

    def settle_keys(self, then: tuple[str, str], now: tuple[str, str]) -> list[str]:
        """``settle.lua``'s KEYS for a reservation made in period ``then``, settled in ``now``."""
        periods = (*then, *now)
        cached, keys = self._settle
        if cached == periods:
            return keys
        reserved, current = self.budgets(*then), self.budgets(*now)
        keys = []
        for level in range(2):
            d_then, m_then, total = reserved[level]
            d_now, m_now, _ = current[level]
            keys += [self.rpm[level], self.tpm[level], d_then, m_then, total, d_now, m_now]
        keys += self.conc
        keys += self.resv
        # 19..24: the rebuilt marks of the reservation-period counters (3..5, 10..12)
        keys += [keys[i] + REBUILT_MARK for i in (2, 3, 4, 9, 10, 11)]
        keys = PackedKeys(keys)
        self._settle = (periods, keys)
        return keys


class Limiter:
    """RPM / TPM / concurrency limits and token budgets, per key and per tenant, in Redis.

    Commands go over one pipelined connection per limiter
    (:class:`~neuronetz_gateway.adapters.redis_pipeline.PipelinedRedis`, to
    the server ``redis`` is configured for) when that client can speak to it,
    else through ``redis`` itself. Call :meth:`aclose` when done.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "nz",
        ledger: LedgerSource,
        clock: Callable[[], float] = time.time,
        lease_ttl_seconds: int = 60,
        timeout_seconds: float = 1.0,
        ledger_timeout_seconds: float = 5.0,
        reservation_ttl_seconds: float = DEFAULT_RESERVATION_TTL_SECONDS,
    ) -> None:
        if min(lease_ttl_seconds, timeout_seconds, ledger_timeout_seconds) <= 0:
            raise ValueError("lease TTL and timeouts must be positive")
        if reservation_ttl_seconds <= 0:
            raise ValueError("the reservation TTL must be positive")
        self._redis = redis
        self._commands: RedisCommands = command_channel(redis, timeout_seconds)
        # the pipelined client enforces the timeout per command
        self._bounded = isinstance(self._commands, PipelinedRedis)
        self._prefix = prefix
        self._ledger = ledger
        self._clock = clock
        self._lease_ttl_ms = int(lease_ttl_seconds * 1000)
        self._reservation_ttl_ms = int(reservation_ttl_seconds * 1000)
        self._timeout = timeout_seconds
        self._ledger_timeout = ledger_timeout_seconds
        self._ledger_flights: dict[
            tuple[int, int | None, str, str], asyncio.Future[tuple[int, LedgerTotals]]
        ] = {}
        self._keys: dict[tuple[int, int], _Keys] = {}
        # RPM hit members and lease ids: unique per process (random) and per call (counter)
        self._unique = secrets.token_hex(8)
        self._sequence = itertools.count()

    # public API -----------------------------------------------------------------

    @property
    def pipelined(self) -> bool:
        """Whether commands go over the pipelined connection (else through redis-py)."""
        return isinstance(self._commands, PipelinedRedis)

    async def aclose(self) -> None:
        """Close the limiter's own connection (the redis-py client stays the caller's)."""
        await self._commands.aclose()

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
        lease_id = f"{self._unique}{next(self._sequence):x}" if needs_lease else None
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
        single_use_until_ms: int | None = None,
    ) -> Decision:
        """Add ``tokens`` to both levels' budgets and TPM window if all stay within limits.

        The allowance carries the token values only (requests were counted by
        ``admit`` and are not counted again). With ``single_use_until_ms`` (the
        identity's expiry) the same script first claims the identity
        ``request_id`` (see :meth:`claim_identity`); a second claim raises
        :class:`IdentityReplayed` and records nothing.

        An allowed reservation of more than zero tokens gets a record
        (``Decision.reservation_id``): pass that id to :meth:`settle`. One never
        settled is taken back out of the budgets after the reservation TTL, by
        the next decision of its tenant.
        """
        if tokens < 0:
            raise ValueError("tokens to reserve must not be negative")
        return await self._decide(
            "reserve",
            tenant_id,
            key_id,
            key_limits,
            tenant_limits,
            request_id,
            tokens,
            None,
            single_use_until_ms,
        )

    async def claim_identity(self, *, tenant_id: int, request_id: str, expires_at_ms: int) -> None:
        """Mark the signed identity ``request_id`` used (one ``SET NX``), or raise.

        :class:`IdentityReplayed` when it was claimed before (here or inside a
        :meth:`reserve`); the marker lives until the identity expires (plus a
        second), after which the identity no longer verifies anyway.
        """
        marker, ttl_ms = self._marker(tenant_id, request_id, expires_at_ms)
        reply = await self._call(self._commands.execute("SET", marker, "1", "NX", "PX", ttl_ms))
        if reply is None:
            raise IdentityReplayed(request_id)

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
        release_lease_id: str | None = None,
        reservation_id: str | None = None,
        audited_at: float | None = None,
    ) -> Allowance:
        """Correct a reservation to the real count (``actual - reserved``, may be negative).

        Adjusts the budget counters of ``reserved_at``'s periods and its TPM
        bucket (if still in the window). Returns the remaining allowance; pass
        the limits to get it, without them every value is ``None`` (and Redis
        does less work). ``release_lease_id`` also releases that concurrency
        lease, in the same round trip.

        ``reservation_id`` (from :meth:`reserve`'s decision) removes the
        reservation's record; if it had been swept already (it outlived the
        reservation TTL and its tokens were given back), the budgets are charged
        the whole ``actual`` instead of the difference.

        Idempotent per ``reservation_id``: the record is replaced by a "settled"
        mark kept for the reservation TTL, so a settle sent again (a retry of
        one whose answer was lost) charges nothing twice and only releases the
        lease (again). Without a reservation id nothing tells a repeat apart.

        ``audited_at`` (unix s): when the request's audit row was queued, for a
        settle sent after it. A counter rebuilt from a ledger read later holds
        the request already (the census made the rebuild wait for the row): if
        the record is gone (Redis lost it, and rebuilt the counter), that
        counter is not charged again.
        """
        want_stats = key_limits is not None or tenant_limits is not None
        delta = actual - reserved
        if not delta and not want_stats and release_lease_id is None and reservation_id is None:
            return Allowance()
        now_ms = self._now_ms()
        now_s = now_ms // 1000
        keys = self._keys_of(tenant_id, key_id).settle_keys(
            period_ids(reserved_at), period_ids(now_s)
        )
        args = (
            delta,
            int(reserved_at),
            now_ms,
            now_s,
            release_lease_id or "",
            "1" if want_stats else "0",
            reservation_id or "",
            actual,
            # the "settled" mark outlives every retry of this settle (they stop at the TTL)
            now_ms + self._reservation_ttl_ms,
            "" if audited_at is None else int(audited_at * 1000),
        )
        reply = await self._call(self._commands.evalsha(_SETTLE.sha, _SETTLE.text, keys, args))
        if not want_stats:
            return Allowance()
        return compute_allowance(
            key_limits or Limits(),
            tenant_limits or Limits(),
            _usage(reply[0]),
            _usage(reply[1]),
        )

    async def read_state(
        self, *, tenant_id: int, key_id: int, key_limits: Limits, tenant_limits: Limits
    ) -> KeyState:
        """What the key and its tenant have used of every limit that is set; records nothing.

        One round trip (plus a ledger rebuild of lost budget counters, as for
        :meth:`admit`). Costs the key no request and takes no lease.
        """
        now_ms = self._now_ms()
        now_s = now_ms // 1000
        day, month = period_ids(now_s)
        keys = self._keys_of(tenant_id, key_id)
        script_keys = keys.decide_keys(day, month)
        args = (now_ms, now_s, *_limit_argv(key_limits, tenant_limits))
        commands = self._commands
        reply = await self._call(commands.evalsha(_STATE.sha, _STATE.text, script_keys, args))
        if _text(reply[0]) == "missing":
            now = datetime.fromtimestamp(now_ms / 1000, UTC)
            missing = [_text(m) for m in reply[1]]
            await self._rebuild_budgets(tenant_id, key_id, now, keys.budgets(day, month), missing)
            reply = await self._call(commands.evalsha(_STATE.sha, _STATE.text, script_keys, args))
            if _text(reply[0]) == "missing":
                raise LimiterUnavailable("budget counters could not be rebuilt")
        return KeyState(
            read_at_ms=now_ms,
            key=_level_state(reply[1], key_limits),
            tenant=_level_state(reply[2], tenant_limits),
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
            return bool(await self._call(self._commands.execute("PING")))
        except LimiterUnavailable:
            return False

    # internals --------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _marker(self, tenant_id: int, request_id: str, expires_at_ms: int) -> tuple[str, int]:
        """The identity's single-use marker key (in its tenant's slot) and lifetime in ms."""
        ttl_ms = max(expires_at_ms - self._now_ms(), 0) + _MARKER_GRACE_MS
        return f"{self._prefix}:{{t{tenant_id}}}:used:{request_id}", ttl_ms

    def _keys_of(self, tenant_id: int, key_id: int) -> _Keys:
        keys = self._keys.get((tenant_id, key_id))
        if keys is None:
            if len(self._keys) >= _MAX_CACHED_KEYS:
                self._keys.clear()  # cheap to rebuild; a bound, not an LRU
            keys = self._keys[(tenant_id, key_id)] = _Keys(self._prefix, tenant_id, key_id)
        return keys

    async def _call(self, call: Awaitable[T]) -> T:
        """Await one Redis call, bounded in time; any failure becomes LimiterUnavailable.

        The pipelined client bounds every command by the same timeout itself
        (one timer for all of them); redis-py gets a timeout per call.
        """
        try:
            if self._bounded:
                return await call
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError:
            raise LimiterUnavailable("redis did not answer in time") from None
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"redis failed: {type(exc).__name__}: {exc}") from exc

    async def _lease(self, action: str, tenant_id: int, key_id: int, lease_id: str) -> None:
        expiry_ms = self._now_ms() + self._lease_ttl_ms
        keys = self._keys_of(tenant_id, key_id).conc
        args = (action, lease_id, expiry_ms, self._lease_ttl_ms + 1000)
        await self._call(self._commands.evalsha(_LEASE.sha, _LEASE.text, keys, args))

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
        single_use_until_ms: int | None = None,
    ) -> Decision:
        now_ms = self._now_ms()
        now_s = now_ms // 1000
        day, month = period_ids(now_s)
        script_keys = self._keys_of(tenant_id, key_id).decide_keys(day, month)
        reservation_id = (
            f"{self._unique}{next(self._sequence):x}" if mode == "reserve" and tokens else ""
        )
        marker_ttl: tuple[int, ...] = ()
        if single_use_until_ms is not None:
            marker, ttl_ms = self._marker(tenant_id, request_id, single_use_until_ms)
            script_keys = [*script_keys, marker]
            marker_ttl = (ttl_ms,)
        args: tuple[RedisArg, ...] = (
            mode,
            now_ms,
            now_s,
            # unique per hit, so hits with one request id or in one millisecond all count
            f"{request_id}:{self._unique}{next(self._sequence):x}",
            lease_id or "",
            now_ms + self._lease_ttl_ms,
            self._lease_ttl_ms + 1000,
            tokens,
            *_limit_argv(key_limits, tenant_limits),
            reservation_id,
            now_ms + self._reservation_ttl_ms,
            *marker_ttl,
        )
        commands = self._commands
        reply = await self._call(commands.evalsha(_DECIDE.sha, _DECIDE.text, script_keys, args))
        if _text(reply[0]) == "missing":
            missing = [_text(m) for m in reply[1]]
            now = datetime.fromtimestamp(now_ms / 1000, UTC)
            budgets = self._keys_of(tenant_id, key_id).budgets(day, month)
            await self._rebuild_budgets(tenant_id, key_id, now, budgets, missing)
            reply = await self._call(commands.evalsha(_DECIDE.sha, _DECIDE.text, script_keys, args))
            if _text(reply[0]) == "missing":
                # evicted again at once: deciding without it would not be a check
                raise LimiterUnavailable("budget counters could not be rebuilt")
        status = _text(reply[0])
        if status == "replay":
            raise IdentityReplayed(request_id)
        _, key_stats, tenant_stats, raw_refusals = reply
        tenant_usage = _usage(tenant_stats)
        allowance = compute_allowance(
            key_limits, tenant_limits, _usage(key_stats), tenant_usage, now_ms
        )
        if status == "ok":
            # what decide((), ...) answers, with the reservation id (no dataclasses.replace)
            return Decision(
                allowed=True,
                lease_id=lease_id,
                reservation_id=reservation_id or None,
                allowance=allowance,
                tenant_usage=tenant_usage,
            )
        need = 1 if mode == "admit" else tokens
        limits = {"key": key_limits, "tenant": tenant_limits}
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        refusals = [self._refusal(raw, limits, now_ms, now, need) for raw in raw_refusals]
        return decide(refusals, allowance, tenant_usage=tenant_usage)

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
        """Write the missing counters from the ledger with SET NX (a racing writer wins).

        Each counter written gets its rebuilt mark: the time (taken before the
        ledger is asked, so never later than the ledger it holds) for
        ``settle.lua``.
        """
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

        # the oldest start of the (shared) ledger reads these values come from
        read_at_ms = min(started for started, _ in found)
        counters: list[str] = []
        args: list[RedisArg] = [read_at_ms, self._reservation_ttl_ms + _REBUILT_MARK_SLACK_MS]
        for level, (_, ledger) in zip(levels, found, strict=True):
            values = (ledger.daily, ledger.monthly, ledger.total)
            for b, name in enumerate(_BUDGET_NAMES):
                if (_LEVELS[level], name) in wanted:
                    ttl = _BUDGET_TTLS[b]
                    counters.append(budgets[level][b])
                    args += [values[b], -1 if ttl is None else ttl]
        if not counters:  # nothing asked for (a script with no key has no slot on a Cluster)
            return
        keys = [*counters, *(c + REBUILT_MARK for c in counters)]
        await self._call(self._commands.evalsha(_REBUILD.sha, _REBUILD.text, keys, args))

    async def _ledger_totals(
        self, tenant_id: int, key_id: int | None, now: datetime
    ) -> tuple[int, LedgerTotals]:
        """One ledger query per level and period at a time, shared by concurrent callers.

        After a Redis restart every request of a busy tenant finds its counters
        missing at once; they wait for one query instead of each sending one.
        Returns when the shared query began (unix ms, before the census wait
        and the read: the rebuilt mark) and its totals.
        """
        day, month = period_ids(now.timestamp())
        flight = (tenant_id, key_id, day, month)
        task = self._ledger_flights.get(flight)
        if task is None:
            task = asyncio.ensure_future(
                self._read_ledger(
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

    async def _read_ledger(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> tuple[int, LedgerTotals]:
        started_ms = self._now_ms()
        # bounded as its callers are: shielded from them, a read the census held back
        # (Postgres away) polled on after all had given up, and later callers joining it
        # got a mark from when it began
        async with asyncio.timeout(self._ledger_timeout):
            totals = await self._ledger.ledger_totals(
                tenant_id=tenant_id, key_id=key_id, day_start=day_start, month_start=month_start
            )
        return started_ms, totals

    def _land(self, flight: tuple[int, int | None, str, str], done: asyncio.Future[Any]) -> None:
        self._ledger_flights.pop(flight, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a failure nobody awaited is not logged as lost
