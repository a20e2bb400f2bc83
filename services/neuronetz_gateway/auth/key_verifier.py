"""Key verification without Argon2 on the hot path, and without Argon2 for a wrong key.

Order of work, cheapest first::

    parse_key (shape + checksum, no I/O)           garbage stops here
    in-process cache by HMAC fingerprint           the hot path ends here
    in-process negative cache                      a repeated wrong key stops here
    single flight per fingerprint                  a burst of one cold key: one lookup
      Redis cache (shared by replicas)
      Postgres by prefix (Store.find_key_for_auth) an unknown prefix stops here;
        one lookup in flight per prefix            a burst of secrets on one prefix: one
      revoked / expired: refused without Argon2
      stored fingerprints (domain.key_fingerprints) a known key is accepted here,
                                                   a wrong secret refused here
      only for a hash without a usable fingerprint:
        per-prefix failure budget                  many *different* wrong secrets
        Argon2id in a thread, bounded, one at a time per prefix;
        on a match the fingerprint is stored, so this happens once per key

Why fingerprints: someone who knows only a key's public prefix can send
wrong secrets with valid checksums. Refused by the stored keyed fingerprint
(HMAC under the server secret), they cost one lookup, exactly what an
unknown prefix costs, so timing does not tell whether a prefix exists, and
they spend nothing of the Argon2 budget, so the owner's key, cached or not,
keeps working. Argon2 stays the verifier of record: a fingerprint is stored
only after Argon2 accepted the key (or by the CLI that made the key), and
a trigger clears it whenever its hash changes.

The per-prefix budget now bounds only the Argon2 work for keys without a
usable fingerprint (made by a CLI without ``NZ_GATEWAY_SECRET`` and never
used, or fingerprinted under a secret this replica does not hold): once a
prefix has failed ``failure_burst`` times, further unknown secrets for it are
refused without Argon2 until the budget refills (one verification per
``failure_refill_seconds``). Such a key, while under attack, may be refused:
the price of bounding the Argon2 work, paid until its first success.

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
from typing import Any, Protocol

import asyncpg
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import AuthKeyRecord
from neuronetz_gateway.auth.key_cache import LocalKeyCache, VerifiedKey
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys, Verdict
from neuronetz_gateway.domain.keys import (
    KEY_LENGTH,
    PREFIX_LENGTH,
    InvalidKeyFormat,
    fingerprint,
    parse_key,
)
from neuronetz_gateway.domain.policy import key_state_refusal, resolve_policy
from neuronetz_gateway.logging import get_logger

__all__ = ["KeyCheck", "KeyRecords", "KeyStoreUnavailable", "KeyVerifier", "SharedKeyCache"]

log = get_logger(__name__)


class KeyStoreUnavailable(Exception):
    """The key could not be checked (Redis or Postgres failed): answer 503."""


class KeyRecords(Protocol):
    """The key rows (Postgres: ``adapters/postgres/store.Store``); raise asyncpg/OS errors."""

    async def find_key_for_auth(self, prefix: str) -> AuthKeyRecord | None: ...

    async def set_key_fingerprint(
        self, key_id: int, *, previous: bool, verified_hash: str, fingerprint: str
    ) -> bool: ...

    async def update_key_hash(
        self, key_id: int, old_hash: str, new_hash: str, fingerprint: str | None = None
    ) -> None: ...


class SharedKeyCache(Protocol):
    """The verified-key cache replicas share (Redis: ``auth/key_cache.RedisKeyCache``)."""

    async def get(self, fp: str) -> tuple[VerifiedKey | None, int]: ...
    async def put(self, fp: str, key: VerifiedKey, since_ms: int) -> bool: ...
    async def evict_prefix(self, prefix: str) -> int: ...
    async def evict_tenant(self, tenant_id: int) -> int: ...
    async def flush(self) -> None: ...


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
        store: KeyRecords,
        hasher: KeyHasher,
        local: LocalKeyCache,
        remote: SharedKeyCache,
        secret: bytes,
        metrics: AuthMetrics,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        failure_burst: int = 3,
        failure_refill_seconds: float = 5.0,
        previous_secret: bytes | None = None,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._local = local
        self._remote = remote
        self._secret = secret
        self._fingerprints = FingerprintKeys(secret, previous_secret)
        self._metrics = metrics
        self._clock = clock
        self._budget = _FailureBudget(failure_burst, failure_refill_seconds, monotonic)
        self._flights: dict[str, asyncio.Task[KeyCheck]] = {}
        self._lookups: dict[str, asyncio.Task[AuthKeyRecord | None]] = {}
        self._prefix_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._remote_dirty = False
        self._remote_flush: asyncio.Task[None] | None = None  # one at a time, shared
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

    async def _flush_dirty_remote(self) -> None:
        """Flush the Redis cache once for every lookup that found it dirty (not one SCAN each)."""
        task = self._remote_flush
        if task is None:
            task = asyncio.get_running_loop().create_task(self._remote.flush())
            self._remote_flush = task

            def done(finished: asyncio.Task[None]) -> None:
                self._remote_flush = None
                if not finished.cancelled() and finished.exception() is None:
                    self._remote_dirty = False

            task.add_done_callback(done)
        await asyncio.shield(task)

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
                await self._flush_dirty_remote()
            cached, since_ms = await self._remote.get(fp)
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"redis: {type(exc).__name__}") from exc
        if cached is not None and cached.valid_at(self._clock()):
            self._metrics.key_cache("redis_hit")
            if self.use_local:
                self._local.put(fp, cached, epoch)
            return KeyCheck(cached, "ok", prefix)
        self._metrics.key_cache("miss")
        # No per-prefix refusal before this lookup: it would make a known prefix
        # under attack answer faster than an unknown one (a prefix oracle).
        try:
            record = await self._lookup(prefix)
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
        candidates = _candidates(record, now)
        verified = await self._by_fingerprint(record, candidates, full_key)
        if verified is None:
            unsure = [c for c in candidates if c.verdict is Verdict.UNKNOWN]
            if not unsure:  # every hash has a fingerprint and none is this key's
                return self._refuse(fp, "wrong_secret", prefix)
            outcome = await self._verify_locked(record, unsure, full_key, fp)
            if isinstance(outcome, str):
                return KeyCheck(None, outcome, prefix)
            verified = outcome
        try:
            if await self._remote.put(fp, verified, since_ms) and self.use_local:
                self._local.put(fp, verified, epoch)
        except (RedisError, OSError) as exc:
            raise KeyStoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return KeyCheck(verified, "ok", prefix)

    async def _lookup(self, prefix: str) -> AuthKeyRecord | None:
        """One Postgres lookup per prefix at a time, shared by every key that waits for it.

        A burst of different secrets under one prefix (known or not: the same
        for both) costs one query, not one each.
        """
        lookup = self._lookups.get(prefix)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._store.find_key_for_auth(prefix))
            self._lookups[prefix] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(prefix, done))
        return await asyncio.shield(lookup)

    def _lookup_done(self, prefix: str, task: asyncio.Task[AuthKeyRecord | None]) -> None:
        if self._lookups.get(prefix) is task:
            del self._lookups[prefix]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it

    def _refuse(self, fp: str, reason: str, prefix: str) -> KeyCheck:
        self._local.put_negative(fp, reason)
        return KeyCheck(None, reason, prefix)

    async def _by_fingerprint(
        self, record: AuthKeyRecord, candidates: list[_Candidate], full_key: str
    ) -> VerifiedKey | None:
        """The key if a stored fingerprint matches it; ``None`` otherwise (no Argon2)."""
        for candidate in candidates:
            candidate.verdict = self._fingerprints.check(candidate.fingerprint, full_key)
            self._metrics.fingerprint(candidate.verdict.value)
        for candidate in candidates:
            if candidate.verdict is Verdict.MATCH_PREVIOUS_SECRET:
                # NZ_GATEWAY_SECRET is being rotated: re-key the fingerprint, so the
                # key stays decidable without Argon2 once the old secret is dropped
                await self._store_fingerprint(record, candidate, full_key)
            if candidate.verdict in (Verdict.MATCH, Verdict.MATCH_PREVIOUS_SECRET):
                return _verified_key(record, candidate.valid_until)
        return None

    async def _verify_locked(
        self, record: AuthKeyRecord, unsure: list[_Candidate], full_key: str, fp: str
    ) -> VerifiedKey | str:
        """:meth:`_verify`, one at a time per prefix (the budget is per prefix)."""
        prefix = record.key.prefix
        lock = self._prefix_locks.setdefault(prefix, asyncio.Lock())
        try:
            async with lock:
                return await self._verify(record, unsure, full_key, fp)
        finally:
            if not lock.locked() and self._prefix_locks.get(prefix) is lock:
                del self._prefix_locks[prefix]

    async def _verify(
        self, record: AuthKeyRecord, unsure: list[_Candidate], full_key: str, fp: str
    ) -> VerifiedKey | str:
        """Argon2 against the hashes no fingerprint could decide, within the budget."""
        prefix = record.key.prefix
        if self._local.get_negative(fp) is not None:  # settled while we queued
            return "wrong_secret"
        if not self._budget.available(prefix):
            self._metrics.argon2_throttled.inc()
            return "throttled"  # not remembered: the same key may be right later
        for candidate in unsure:
            matched = await self._hasher.verify(candidate.stored_hash, full_key)
            self._metrics.argon2(matched)
            if matched:
                if not candidate.previous and self._hasher.needs_rehash(candidate.stored_hash):
                    self._spawn(self._rehash(record.key.id, candidate.stored_hash, full_key))
                else:
                    await self._store_fingerprint(record, candidate, full_key)
                return _verified_key(record, candidate.valid_until)
        self._budget.spend(prefix)
        self._local.put_negative(fp, "wrong_secret")
        return "wrong_secret"

    async def _store_fingerprint(
        self, record: AuthKeyRecord, candidate: _Candidate, full_key: str
    ) -> None:
        """Best effort: without it the key still verifies, with Argon2."""
        try:
            await self._store.set_key_fingerprint(
                record.key.id,
                previous=candidate.previous,
                verified_hash=candidate.stored_hash,
                fingerprint=self._fingerprints.make(full_key),
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("fingerprint_store_failed", key_id=record.key.id, error=type(exc).__name__)

    async def _rehash(self, key_id: int, old_hash: str, full_key: str) -> None:
        """Store a hash with today's parameters (its UPDATE also evicts the caches)."""
        try:
            new_hash = await asyncio.to_thread(self._hasher.hash, full_key)
            await self._store.update_key_hash(
                key_id, old_hash, new_hash, self._fingerprints.make(full_key)
            )
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


@dataclass(slots=True)
class _Candidate:
    """One hash the presented key may match: the current one, or the one in its grace."""

    stored_hash: str
    fingerprint: str | None
    previous: bool
    valid_until: float | None  # the end of the rotation grace for the previous hash
    verdict: Verdict = Verdict.UNKNOWN


def _candidates(record: AuthKeyRecord, now: float) -> list[_Candidate]:
    found = [_Candidate(record.secret_hash, record.secret_fingerprint, False, None)]
    grace_end = record.key.previous_valid_until
    if record.previous_hash and grace_end is not None and grace_end.timestamp() > now:
        grace = grace_end.timestamp()
        found.append(_Candidate(record.previous_hash, record.previous_fingerprint, True, grace))
    return found


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
