"""Key verification without Argon2 on the hot path.

Order of work, cheapest first::

    parse_key (shape + checksum, no I/O)           garbage stops here
    in-process cache by HMAC fingerprint           the hot path ends here
    in-process negative cache                      a repeated wrong key stops here
    single flight per fingerprint                  a burst of one cold key: one lookup
      Redis cache (shared by replicas)
      per-prefix failure budget                    many *different* wrong secrets
      Postgres by prefix (Store.find_key_for_auth)
      revoked / expired: refused without Argon2
      per-prefix failure budget (again, after the wait for the lookup)
      Argon2id in a thread, bounded, one at a time per prefix

Why a per-prefix budget: a mistyped key almost never passes the checksum,
so a wrong secret with a valid checksum under a real prefix is an attack (or
a client still using a rotated-out key, which the negative cache absorbs
after one verification). Once a prefix has failed ``failure_burst`` times,
further unknown secrets for it are refused without Argon2 until the budget
refills (one verification per ``failure_refill_seconds``). A legitimate key
that is cached keeps working meanwhile; one that is not may be refused
during an active attack on its prefix: that is the price of bounding the
Argon2 work.

Errors::

    Exception
    └── KeyStoreUnavailable   Redis or Postgres could not be asked: fail closed (503)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import AuthKeyRecord, Store
from neuronetz_gateway.auth.key_cache import LocalKeyCache, RedisKeyCache, VerifiedKey
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.keys import (
    KEY_LENGTH,
    PREFIX_LENGTH,
    InvalidKeyFormat,
    fingerprint,
    parse_key,
)
from neuronetz_gateway.domain.policy import key_state_refusal, resolve_policy
from neuronetz_gateway.logging import get_logger

__all__ = ["KeyCheck", "KeyStoreUnavailable", "KeyVerifier"]

log = get_logger(__name__)


class KeyStoreUnavailable(Exception):
    """The key could not be checked (Redis or Postgres failed): answer 503."""


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The outcome of checking a presented key; ``key`` is set only when it is valid."""

    key: VerifiedKey | None
    reason: str  # ok | missing | malformed | unknown | wrong_secret | revoked | expired | throttled
    prefix: str | None = None  # the parsed prefix (not secret), for the log line


_MISSING = KeyCheck(None, "missing")
_MALFORMED = KeyCheck(None, "malformed")


class _FailureBudget:
    """A token bucket of Argon2 verifications per prefix that may fail."""

    def __init__(self, burst: int, refill_seconds: float, monotonic: Callable[[], float]) -> None:
        self._burst = float(burst)
        self._refill = refill_seconds
        self._now = monotonic
        self._state: dict[str, tuple[float, float]] = {}

    def _tokens(self, prefix: str) -> float:
        tokens, at = self._state.get(prefix, (self._burst, self._now()))
        return min(self._burst, tokens + (self._now() - at) / self._refill)

    def available(self, prefix: str) -> bool:
        return self._tokens(prefix) >= 1.0

    def spend(self, prefix: str) -> None:
        self._state[prefix] = (self._tokens(prefix) - 1.0, self._now())


class KeyVerifier:
    """Checks presented keys against the caches, Postgres and Argon2id."""

    def __init__(
        self,
        *,
        store: Store,
        hasher: KeyHasher,
        local: LocalKeyCache,
        remote: RedisKeyCache,
        secret: bytes,
        metrics: AuthMetrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        failure_burst: int = 3,
        failure_refill_seconds: float = 5.0,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._local = local
        self._remote = remote
        self._secret = secret
        self._metrics = metrics
        self._clock = clock
        self._budget = _FailureBudget(failure_burst, failure_refill_seconds, monotonic)
        self._flights: dict[str, asyncio.Task[KeyCheck]] = {}
        self._prefix_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._remote_dirty = False
        # False while the change listener is not listening: the local cache could
        # miss an eviction then, so it is bypassed (the Redis cache is still used;
        # listening replicas evict it, and every reconnect flushes it).
        self.use_local = False

    # the hot path -------------------------------------------------------------

    async def check(self, presented: str | None) -> KeyCheck:
        """Check one presented key; raises :class:`KeyStoreUnavailable` when it cannot."""
        if not presented:
            return _MISSING
        if len(presented) != KEY_LENGTH:
            return _MALFORMED  # what parse_key would say, without hashing a long string
        fp = fingerprint(presented, self._secret)
        if self.use_local:
            cached = self._local.get(fp)
            if cached is not None:
                # only a key that parsed is ever cached, so this one parses: skip it
                if cached.valid_at(self._clock()):
                    self._metrics.key_cache("local_hit")
                    return KeyCheck(cached, "ok", presented[:PREFIX_LENGTH])
                self._local.drop(fp)
        try:
            parsed = parse_key(presented)
        except InvalidKeyFormat:
            return _MALFORMED
        refused = self._local.get_negative(fp)
        if refused is not None:
            self._metrics.key_cache("negative_hit")
            return KeyCheck(None, refused, parsed.prefix)
        flight = self._flights.get(fp)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._resolve(parsed.full, fp))
            self._flights[fp] = flight
            flight.add_done_callback(lambda done: self._flight_done(fp, done))
        # shielded: a caller that times out must not cancel the others' lookup
        return await asyncio.shield(flight)

    def _flight_done(self, fp: str, task: asyncio.Task[KeyCheck]) -> None:
        if self._flights.get(fp) is task:
            del self._flights[fp]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it

    # the slow path ------------------------------------------------------------

    async def _resolve(self, full_key: str, fp: str) -> KeyCheck:
        prefix = full_key[:PREFIX_LENGTH]
        epoch = self._local.epoch
        try:
            if self._remote_dirty:
                await self._remote.flush()
                self._remote_dirty = False
            cached, since_ms = await self._remote.get(fp)
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"redis: {type(exc).__name__}") from exc
        if cached is not None and cached.valid_at(self._clock()):
            self._metrics.key_cache("redis_hit")
            if self.use_local:
                self._local.put(fp, cached, epoch)
            return KeyCheck(cached, "ok", prefix)
        self._metrics.key_cache("miss")
        if not self._budget.available(prefix):
            # Under attack: refuse before Postgres too, not only before Argon2. A
            # legitimate key cached in Redis was served above.
            self._metrics.argon2_throttled.inc()
            return KeyCheck(None, "throttled", prefix)
        try:
            record = await self._store.find_key_for_auth(prefix)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise KeyStoreUnavailable(f"postgres: {type(exc).__name__}") from exc
        if record is None:
            return self._refuse(fp, "unknown", prefix)
        now = self._clock()
        state = key_state_refusal(
            datetime.fromtimestamp(now, UTC),
            revoked_at=record.key.revoked_at,
            expires_at=record.key.expires_at,
        )
        if state is not None:
            return self._refuse(fp, state, prefix)
        lock = self._prefix_locks.setdefault(prefix, asyncio.Lock())
        try:
            async with lock:
                verified = await self._verify(record, full_key, fp, now)
        finally:
            if not lock.locked() and self._prefix_locks.get(prefix) is lock:
                del self._prefix_locks[prefix]
        if isinstance(verified, str):
            return KeyCheck(None, verified, prefix)
        try:
            if await self._remote.put(fp, verified, since_ms) and self.use_local:
                self._local.put(fp, verified, epoch)
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return KeyCheck(verified, "ok", prefix)

    def _refuse(self, fp: str, reason: str, prefix: str) -> KeyCheck:
        self._local.put_negative(fp, reason)
        return KeyCheck(None, reason, prefix)

    async def _verify(
        self, record: AuthKeyRecord, full_key: str, fp: str, now: float
    ) -> VerifiedKey | str:
        """Argon2 against the current hash, then the previous one within its grace."""
        prefix = record.key.prefix
        if self._local.get_negative(fp) is not None:  # settled while we queued
            return "wrong_secret"
        if not self._budget.available(prefix):
            self._metrics.argon2_throttled.inc()
            return "throttled"  # not remembered: the same key may be right later
        grace_end = record.key.previous_valid_until
        candidates: list[tuple[str, float | None]] = [(record.secret_hash, None)]
        if record.previous_hash and grace_end is not None and grace_end.timestamp() > now:
            candidates.append((record.previous_hash, grace_end.timestamp()))
        for stored_hash, valid_until in candidates:
            matched = await self._hasher.verify(stored_hash, full_key)
            self._metrics.argon2(matched)
            if matched:
                if valid_until is None and self._hasher.needs_rehash(stored_hash):
                    self._spawn(self._rehash(record.key.id, stored_hash, full_key))
                return _verified_key(record, valid_until)
        self._budget.spend(prefix)
        self._local.put_negative(fp, "wrong_secret")
        return "wrong_secret"

    async def _rehash(self, key_id: int, old_hash: str, full_key: str) -> None:
        """Store a hash with today's parameters (its UPDATE also evicts the caches)."""
        try:
            new_hash = await asyncio.to_thread(self._hasher.hash, full_key)
            await self._store.update_key_hash(key_id, old_hash, new_hash)
        except Exception as exc:  # noqa: BLE001 - best effort; the old hash still verifies
            log.warning("rehash_failed", key_id=key_id, error=type(exc).__name__)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # evictions (driven by the change listener) ---------------------------------

    def evict_local(self, kind: str, ident: str) -> None:
        """Forget a key (``kind="key"``) or a tenant's keys in this process, at once."""
        if kind == "key":
            self._local.evict_prefix(ident)
        elif kind == "tenant" and ident.isdigit():
            self._local.evict_tenant(int(ident))
        else:
            self._local.flush()

    async def evict_remote(self, kind: str, ident: str) -> None:
        """The same in Redis; when that fails, the Redis cache is flushed before next use."""
        try:
            if kind == "key":
                await self._remote.evict_prefix(ident)
            elif kind == "tenant" and ident.isdigit():
                await self._remote.evict_tenant(int(ident))
            else:
                await self._remote.flush()
        except (RedisError, OSError) as exc:
            self._remote_dirty = True
            log.warning("key_cache_evict_failed", kind=kind, error=type(exc).__name__)

    async def flush(self) -> None:
        """Forget every cached key, here and in Redis (after a listener gap)."""
        self._local.flush()
        self._metrics.cache_flushes.inc()
        try:
            await self._remote.flush()
            self._remote_dirty = False
        except (RedisError, OSError) as exc:
            self._remote_dirty = True
            log.warning("key_cache_flush_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        """Wait for background work (rehashes) to finish."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _verified_key(record: AuthKeyRecord, grace_end: float | None) -> VerifiedKey:
    policy = resolve_policy(record.tenant.policy, record.key.policy)
    ends = [t for t in (grace_end,) if t is not None]
    if record.key.expires_at is not None:
        ends.append(record.key.expires_at.timestamp())
    return VerifiedKey(
        key_id=record.key.id,
        prefix=record.key.prefix,
        tenant_id=record.tenant.id,
        tenant_name=record.tenant.name,
        key_limits=policy.key_limits,
        tenant_limits=policy.tenant_limits,
        models=None if policy.models is None else list(policy.models),
        caps=policy.caps,
        log_prompts=record.key.log_prompts,
        prompt_ttl_days=record.key.prompt_ttl_days,
        valid_until=min(ends) if ends else None,
    )
