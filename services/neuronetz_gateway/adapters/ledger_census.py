"""The ledger census in Redis: budgets are rebuilt only from a complete ledger.

- :class:`LedgerBeacon` (proxy, next to its audit writer) reports since when
  the writer holds unwritten rows, every ``beat_seconds`` and after every
  write or replay (``HSET`` of its entry in ``<prefix>:{ledger}:writers``).
- :class:`CompleteLedger` (auth and proxy: the limiter's ledger) waits,
  before it reads the ledger for a rebuild, until the census says every
  live writer's rows older than the rebuild are in Postgres
  (:func:`~neuronetz_gateway.domain.ledger_census.ledger_complete`). The
  limiter bounds the wait with its ledger timeout and fails closed (503).

See :mod:`neuronetz_gateway.domain.ledger_census` for the rule. Clocks: the
writers' and the rebuilders' wall clocks are compared (NTP-close hosts).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from redis.exceptions import RedisError

from neuronetz_gateway.adapters.postgres.store import LedgerTotals
from neuronetz_gateway.adapters.redis_commands import RedisCommands
from neuronetz_gateway.domain.ledger_census import (
    census_entry,
    census_key,
    ledger_complete,
    stale_entries,
)
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.stopping import stop_task, wait_set

__all__ = ["CompleteLedger", "LedgerBeacon"]

log = get_logger(__name__)


class PendingRows(Protocol):
    """What the beacon reports on (the audit writer)."""

    progress: asyncio.Event

    def pending_since(self) -> float | None: ...


class Ledger(Protocol):
    """The ledger a rebuild reads (the Postgres store)."""

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals: ...


class LedgerBeacon:
    """One writer's census entry, kept fresh while the writer runs."""

    def __init__(
        self,
        commands: RedisCommands,
        *,
        prefix: str,
        writer: PendingRows,
        # a rebuild (a key's first budget decision of the day, too) waits up to one beat
        beat_seconds: float = 0.1,
        ttl_seconds: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._commands = commands
        self._key = census_key(prefix)
        self._writer = writer
        self._beat = beat_seconds
        self._ttl_ms = int(ttl_seconds * 1000)
        self._clock = clock
        self.writer_id = secrets.token_hex(6)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Report once (best effort) and keep reporting in the background."""
        self._stopping = False
        await self.report()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-beacon")

    async def stop(self) -> None:
        """Stop reporting, and leave a last word: none when the writer holds nothing.

        A writer that holds nothing removes its entry: left in place, it would
        say nothing of the time after it (the census's "reported since the
        rebuild began"), holding every rebuild until it expired. One with rows
        left (the spool) reports once more; that entry expires by itself. Stop
        the writer first, so that its last flush is in what is said.

        The loop also ends by the flag, and the wait is bounded
        (:mod:`neuronetz_gateway.stopping`): redis-py's Cluster and Sentinel clients
        can swallow a cancellation that lands mid-command, and a stop that waited
        for the task then hung for good.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        await stop_task(task, within=self._beat + 2.0)
        if self._writer.pending_since() is not None:
            await self.report()
            return
        try:
            await self._commands.execute("HDEL", self._key, self.writer_id)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("ledger_census_unretired", error=type(exc).__name__)

    async def report(self) -> bool:
        """Write this writer's entry now; ``False`` when Redis cannot take it."""
        now = self._clock()
        entry = census_entry(
            expires_ms=int(now * 1000) + self._ttl_ms,
            pending_since=self._writer.pending_since(),
            reported_at=now,
        )
        try:
            await self._commands.execute("HSET", self._key, self.writer_id, entry)
            await self._commands.execute("PEXPIRE", self._key, self._ttl_ms * 4)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("ledger_census_unreported", error=type(exc).__name__)
            return False
        return True

    async def _run(self) -> None:
        progress = self._writer.progress
        while not self._stopping:
            await wait_set(progress, self._beat)
            progress.clear()
            await self.report()


class CompleteLedger:
    """The ledger, read only once the census says no writer holds older rows."""

    def __init__(
        self,
        ledger: Ledger,
        commands: RedisCommands,
        *,
        prefix: str,
        poll_seconds: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._commands = commands
        self._key = census_key(prefix)
        self._poll = poll_seconds
        self._clock = clock

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        """The store's totals, after :meth:`wait_complete` (the caller bounds the wait)."""
        await self.wait_complete(self._clock())
        return await self._ledger.ledger_totals(
            tenant_id=tenant_id, key_id=key_id, day_start=day_start, month_start=month_start
        )

    async def wait_complete(self, rebuild_at: float) -> None:
        """Return once every row submitted before ``rebuild_at`` is in the ledger."""
        while True:
            raw: Any = await self._commands.execute("HGETALL", self._key)
            entries = _pairs(raw)
            now_ms = int(self._clock() * 1000)
            if ledger_complete(entries, rebuild_at=rebuild_at, now_ms=now_ms):
                return
            stale = stale_entries(entries, now_ms=now_ms)
            if stale:  # writers gone without a word: their entries only slow this down
                await self._commands.execute("HDEL", self._key, *stale)
            await asyncio.sleep(self._poll)


def _pairs(raw: Any) -> dict[str | bytes, str | bytes]:
    """``HGETALL``'s reply as a dict (the pipelined client answers a flat list)."""
    if isinstance(raw, dict):
        return raw
    items = list(raw or [])
    return dict(zip(items[::2], items[1::2], strict=True))
