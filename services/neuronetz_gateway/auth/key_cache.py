"""The verified-key caches: in-process (short TTL) and Redis (shared by the replicas).

Both are keyed by the key's HMAC fingerprint (never the key) and indexed by
key prefix and tenant, so a ``nz_key_events`` notification can evict exactly
what it concerns. A lookup that started before an eviction must not write
back what it read before it: the local cache compares an eviction *epoch*,
the Redis cache refuses a write older than the last eviction marker of the
key, its tenant or the whole cache (Redis time, see :meth:`RedisKeyCache.put`).

Redis layout (one hash tag, ``{kc}``, so every script touches one slot)::

    <prefix>:{kc}:e:<fingerprint>   the VerifiedKey (msgpack), TTL
    <prefix>:{kc}:ik:<key prefix>   SET of fingerprints cached for that key
    <prefix>:{kc}:it:<tenant id>    SET of fingerprints cached for that tenant
    <prefix>:{kc}:ev:k:<key prefix> | ev:t:<tenant id> | ev:all
                                    Redis time (ms) of the last eviction, 2 min
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from neuronetz_gateway.adapters.redis_client import RedisClient
from neuronetz_gateway.adapters.redis_commands import RedisCommands, command_channel
from neuronetz_gateway.adapters.redis_pipeline import RedisArg
from neuronetz_gateway.domain.identity import Limits, OptionCaps

__all__ = ["LocalKeyCache", "RedisKeyCache", "VerifiedKey"]


class VerifiedKey(msgspec.Struct, frozen=True, array_like=True):
    """What a successful verification established: enough to decide without Postgres."""

    key_id: int
    prefix: str
    tenant_id: int
    tenant_name: str
    key_limits: Limits
    tenant_limits: Limits
    models: list[str] | None
    caps: OptionCaps
    log_prompts: bool
    prompt_ttl_days: int | None
    valid_until: float | None  # unix seconds: expiry, or the end of a rotation grace

    def valid_at(self, now: float) -> bool:
        """Whether the key may still be used at unix time ``now``."""
        return self.valid_until is None or now < self.valid_until


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(VerifiedKey).decode


class LocalKeyCache:
    """Positive and negative entries in this process, each with a TTL and a size bound."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        negative_ttl_seconds: float,
        max_entries: int = 50_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._max = max_entries
        self._now = monotonic
        self._entries: dict[str, tuple[VerifiedKey, float]] = {}
        self._negative: dict[str, tuple[str, float]] = {}
        self._by_prefix: dict[str, set[str]] = {}
        self._by_tenant: dict[int, set[str]] = {}
        self.epoch = 0  # bumped by every eviction; a put from an older epoch is dropped

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fp: str) -> VerifiedKey | None:
        """The cached key for fingerprint ``fp`` if still fresh."""
        item = self._entries.get(fp)
        if item is None:
            return None
        if item[1] > self._now():
            return item[0]
        del self._entries[fp]
        return None

    def put(self, fp: str, key: VerifiedKey, epoch: int) -> None:
        """Cache ``key`` unless an eviction happened since ``epoch`` was read."""
        if epoch != self.epoch:
            return
        if len(self._entries) >= self._max:
            self._entries.pop(next(iter(self._entries)))  # oldest insertion first
        self._entries[fp] = (key, self._now() + self._ttl)
        self._by_prefix.setdefault(key.prefix, set()).add(fp)
        self._by_tenant.setdefault(key.tenant_id, set()).add(fp)

    def drop(self, fp: str) -> None:
        """Forget one positive entry."""
        self._entries.pop(fp, None)

    def get_negative(self, fp: str) -> str | None:
        """Why fingerprint ``fp`` was refused recently, or ``None``."""
        item = self._negative.get(fp)
        if item is None:
            return None
        if item[1] > self._now():
            return item[0]
        del self._negative[fp]
        return None

    def put_negative(self, fp: str, reason: str) -> None:
        """Remember a refusal so the same wrong key costs no more work for a while."""
        if len(self._negative) >= self._max:
            self._negative.pop(next(iter(self._negative)))
        self._negative[fp] = (reason, self._now() + self._negative_ttl)

    def evict_prefix(self, prefix: str) -> None:
        """Forget everything cached for one key."""
        self.epoch += 1
        for fp in self._by_prefix.pop(prefix, ()):
            self._entries.pop(fp, None)

    def evict_tenant(self, tenant_id: int) -> None:
        """Forget everything cached for one tenant's keys."""
        self.epoch += 1
        for fp in self._by_tenant.pop(tenant_id, ()):
            self._entries.pop(fp, None)

    def flush(self) -> None:
        """Forget every positive entry (negative ones stay: a wrong key stays wrong)."""
        self.epoch += 1
        self._entries.clear()
        self._by_prefix.clear()
        self._by_tenant.clear()


# KEYS: entry, index-by-key, index-by-tenant, ev:k, ev:t, ev:all
# ARGV: value, ttl ms, fingerprint, since ms (Redis time before the data was read)
_PUT_LUA = """
for i = 4, 6 do
  local evicted = redis.call('GET', KEYS[i])
  if evicted and tonumber(evicted) >= tonumber(ARGV[4]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"""

# KEYS: index, eviction marker; ARGV: entry key prefix, marker ttl ms.
# Entry names are built here from the index; they share the {kc} slot.
_EVICT_LUA = """
local t = redis.call('TIME')
redis.call('SET', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), 'PX', ARGV[2])
local fps = redis.call('SMEMBERS', KEYS[1])
for _, fp in ipairs(fps) do redis.call('DEL', ARGV[1] .. fp) end
redis.call('DEL', KEYS[1])
return #fps
"""

# KEYS: entry. The entry and the time of the node that holds it (the {kc} slot's
# master), in one round trip; a script, because a Cluster pipeline refuses TIME.
_GET_LUA = """
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]), t[1], t[2]}
"""

# KEYS: the whole-cache eviction marker; ARGV: its ttl ms. Returns the node's time in ms.
_MARK_ALL_LUA = """
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[1], now_ms, 'PX', ARGV[1])
return now_ms
"""

_MARKER_TTL_MS = 120_000  # longer than any lookup may take (decision timeout, Argon2 queue)


class _Script:
    """A Lua script run by SHA over the cache's command channel (``EVAL`` on ``NOSCRIPT``).

    One round trip either way: a burst of first calls after a restart must not
    turn into a burst of SCRIPT LOADs, as redis-py's ``Script`` would.
    """

    __slots__ = ("_commands", "_sha", "_text")

    def __init__(self, commands: RedisCommands, text: str) -> None:
        self._commands = commands
        self._text = text
        self._sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis's script id

    async def __call__(self, *, keys: list[str], args: Sequence[RedisArg] = ()) -> Any:
        return await self._commands.evalsha(self._sha, self._text, keys, args)


class RedisKeyCache:
    """The verified-key cache in Redis, shared by every auth replica.

    Lookups, writes and evictions go over :func:`command_channel` (the
    pipelined connection where the deployment allows, else bounded redis-py),
    so a cold burst of misses shares one connection instead of opening one
    per waiting caller; only :meth:`flush` (a ``SCAN``) uses ``redis``
    itself. Call :meth:`aclose` when done.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str,
        ttl_seconds: float,
        timeout_seconds: float = 1.0,
    ) -> None:
        self._redis = redis
        self._commands = command_channel(redis, timeout_seconds)
        self._base = f"{prefix}:{{kc}}"
        self._ttl_ms = int(ttl_seconds * 1000)
        self._put = _Script(self._commands, _PUT_LUA)
        self._evict = _Script(self._commands, _EVICT_LUA)
        self._get = _Script(self._commands, _GET_LUA)
        self._mark_all = _Script(self._commands, _MARK_ALL_LUA)

    async def aclose(self) -> None:
        """Close the cache's own connection (the redis-py client stays the caller's)."""
        await self._commands.aclose()

    def _entry(self, fp: str) -> str:
        return f"{self._base}:e:{fp}"

    async def get(self, fp: str) -> tuple[VerifiedKey | None, int]:
        """The cached key (or ``None``) and Redis's time in ms, in one round trip."""
        raw, seconds, micros = await self._get(keys=[self._entry(fp)])
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if not raw:  # Lua turns a missing entry (nil) into false
            return None, now_ms
        try:
            return _decode(raw), now_ms
        except msgspec.DecodeError:  # written by another version: treat as a miss
            return None, now_ms

    async def put(self, fp: str, key: VerifiedKey, since_ms: int) -> bool:
        """Cache ``key`` unless its key, tenant or the cache was evicted at/after ``since_ms``."""
        keys = [
            self._entry(fp),
            f"{self._base}:ik:{key.prefix}",
            f"{self._base}:it:{key.tenant_id}",
            f"{self._base}:ev:k:{key.prefix}",
            f"{self._base}:ev:t:{key.tenant_id}",
            f"{self._base}:ev:all",
        ]
        stored = await self._put(keys=keys, args=[_encode(key), self._ttl_ms, fp, since_ms])
        return bool(stored)

    async def evict_prefix(self, prefix: str) -> int:
        """Delete the entries of one key; returns how many."""
        keys = [f"{self._base}:ik:{prefix}", f"{self._base}:ev:k:{prefix}"]
        return int(await self._evict(keys=keys, args=[f"{self._base}:e:", _MARKER_TTL_MS]))

    async def evict_tenant(self, tenant_id: int) -> int:
        """Delete the entries of one tenant's keys; returns how many."""
        keys = [f"{self._base}:it:{tenant_id}", f"{self._base}:ev:t:{tenant_id}"]
        return int(await self._evict(keys=keys, args=[f"{self._base}:e:", _MARKER_TTL_MS]))

    async def flush(self) -> None:
        """Delete every entry and index (after a listener gap nothing cached is trusted)."""
        await self._mark_all(keys=[f"{self._base}:ev:all"], args=[_MARKER_TTL_MS])
        batch: list[Any] = []
        for pattern in (f"{self._base}:e:*", f"{self._base}:i*"):
            async for name in self._redis.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 500:
                    await self._redis.unlink(*batch)
                    batch.clear()
        if batch:
            await self._redis.unlink(*batch)
