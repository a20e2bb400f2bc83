"""Tenants' weights in the backend queues (``tenant.weight``), read from Postgres, kept in memory.

The pool asks for a weight on every admission, so the answer must cost no
I/O: :class:`TenantWeights` loads every tenant whose weight is not 1 at
start and every ``refresh_seconds`` after (a weight change takes effect
within that), and answers from the last load. A failed load keeps the last
answer (a Postgres outage must not change anyone's share); before any load
succeeded every tenant weighs 1.
"""

from __future__ import annotations

import asyncio
from typing import Any

from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.stopping import stop_task

__all__ = ["TenantWeights"]

log = get_logger(__name__)

_QUERY = "SELECT id, weight FROM tenant WHERE weight IS NOT NULL AND weight <> 1"


class TenantWeights:
    """``weights(tenant_id)``: the tenant's weight (1 unless set), from memory."""

    def __init__(self, pool: Any, *, refresh_seconds: float = 5.0) -> None:
        self._pool = pool
        self._refresh = refresh_seconds
        self._weights: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._warned = False

    def __call__(self, tenant_id: int) -> int:
        return self._weights.get(tenant_id, 1)

    async def load(self) -> None:
        """Read the weights now (a failure keeps the last ones)."""
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(_QUERY)
        except Exception as exc:  # noqa: BLE001 - Postgres away or not migrated: keep the last
            if not self._warned:
                log.warning("tenant_weights_unavailable", error=type(exc).__name__)
                self._warned = True
            return
        self._warned = False
        self._weights = {int(r["id"]): int(r["weight"]) for r in rows}

    async def start(self) -> None:
        await self.load()
        self._stopping = False
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop refreshing: by the flag too, waiting a bounded time (see ``stopping``)."""
        if self._task is not None:
            task, self._task = self._task, None
            self._stopping = True
            await stop_task(task, within=5.0)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._refresh)
            if not self._stopping:
                await self.load()
