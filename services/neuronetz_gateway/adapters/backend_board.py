"""The backends' shared status in Redis: one check per backend per interval, read by all.

Layout (every key hash-tagged ``{fleet}``, so on a Cluster they share one
slot and one ``MGET`` reads them all)::

    <prefix>:{fleet}:status:<backend>    JSON BackendStatus      (PX: status_ttl)
    <prefix>:{fleet}:check:<backend>     who checks it this round (SET NX PX: interval)

Every proxy replica runs the refresh loop, but only the one that wins
``check:<backend>`` for a round asks that backend (``/api/tags``,
``/api/ps``), so a backend sees one check per interval whatever the number
of replicas; all replicas read the statuses. A status expires when nobody
has checked for a few intervals, so a stale one never outlives the replicas
that wrote it. Redis errors raise :class:`BoardUnavailable`; the caller
then checks the backends itself (a cache, not a dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from neuronetz_gateway.domain.backend_status import BackendStatus, decode_status, encode_status

__all__ = ["BackendBoard", "BoardUnavailable"]


class BoardUnavailable(Exception):
    """Redis could not be asked."""


class BackendBoard:
    """Read and publish backend statuses; claim the right to check a backend this round."""

    def __init__(self, redis: Any, *, prefix: str) -> None:
        self._redis = redis
        self._base = f"{prefix}:{{fleet}}"

    def status_key(self, name: str) -> str:
        return f"{self._base}:status:{name}"

    def check_key(self, name: str) -> str:
        return f"{self._base}:check:{name}"

    async def claim_check(self, name: str, token: str, interval_ms: int) -> bool:
        """Whether this replica checks ``name`` this round (first one wins)."""
        try:
            won = await self._redis.set(self.check_key(name), token, nx=True, px=interval_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(type(exc).__name__) from None
        return bool(won)

    async def publish(self, status: BackendStatus, ttl_ms: int) -> None:
        try:
            await self._redis.set(self.status_key(status.name), encode_status(status), px=ttl_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(type(exc).__name__) from None

    async def read(self, names: Sequence[str]) -> dict[str, BackendStatus]:
        """The statuses of ``names`` that are known (missing and unreadable ones left out)."""
        if not names:
            return {}
        try:
            raws = await self._redis.mget([self.status_key(n) for n in names])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BoardUnavailable(type(exc).__name__) from None
        statuses: dict[str, BackendStatus] = {}
        for name, raw in zip(names, raws, strict=True):
            status = decode_status(bytes(raw)) if raw is not None else None
            if status is not None and status.name == name:
                statuses[name] = status
        return statuses
