"""Settlements Redis did not take, sent again in the background until they land.

A settle that fails (Redis away: a failover, a restart) would leave the
reservation to expire after ``NZ_RESERVATION_TTL_SECONDS``, when the next
decision takes the reserved tokens back out of the budget: the request's real
charge would never land (an under-count). :class:`SettleRetries` keeps the
settlement and sends it again with a growing pause (:func:`retry_delays`)
until it lands or the reservation would have expired; then it gives up,
counted (``nz_proxy_settle_retries_total{outcome="gave_up"}``) and logged
without prompt or key text. The limiter's settle is idempotent per
reservation id (``settle.lua``'s "settled" mark), so a first attempt that did
land but whose answer was lost is not charged twice by its retry.

Nothing here is on a request's path: :meth:`SettleRetries.retry` only starts
a task; the response has been (or is being) sent without waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.ports import LimiterUnavailable, TokenLimiter

__all__ = ["PendingSettle", "SettleRetries", "retry_delays"]

log = get_logger("neuronetz_gateway.proxy")

#: The first pause before a retry, and the longest one.
FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 10.0


def retry_delays(
    first: float = FIRST_DELAY_SECONDS, cap: float = MAX_DELAY_SECONDS
) -> Iterator[float]:
    """Pauses before each retry: ``first``, doubling, never above ``cap`` (endless)."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


@dataclass(frozen=True, slots=True)
class PendingSettle:
    """One settlement to send again (what :meth:`TokenLimiter.settle` is given)."""

    request_id: str
    tenant_id: int
    key_id: int
    reserved: int
    actual: int
    reserved_at: float  # unix seconds, before the reservation was made
    release_lease_id: str | None
    reservation_id: str | None
    audited_at: float | None = None  # unix seconds the request's audit row was queued


class SettleRetries:
    """Background retries of failed settlements, each bounded by the reservation TTL."""

    def __init__(
        self,
        limiter: TokenLimiter,
        *,
        reservation_ttl_seconds: float,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        delays: Callable[[], Iterator[float]] = retry_delays,
    ) -> None:
        self._limiter = limiter
        self._ttl = reservation_ttl_seconds
        self._on_outcome = on_outcome
        self._clock = clock
        self._sleep = sleep
        self._delays = delays
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Settlements still being retried."""
        return len(self._tasks)

    async def wait(self) -> None:
        """Until every retry started so far has ended (landed or given up)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def retry(self, settle: PendingSettle) -> None:
        """Start retrying ``settle`` in the background (returns at once)."""
        task = asyncio.get_running_loop().create_task(
            self._run(settle), name=f"settle-retry-{settle.request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, settle: PendingSettle) -> None:
        deadline = settle.reserved_at + self._ttl  # the reservation expires then
        attempts = 0
        for delay in self._delays():
            left = deadline - self._clock()
            if left <= 0:
                break
            await self._sleep(min(delay, left))
            if self._clock() >= deadline:
                break
            attempts += 1
            try:
                await self._limiter.settle(
                    tenant_id=settle.tenant_id,
                    key_id=settle.key_id,
                    reserved=settle.reserved,
                    actual=settle.actual,
                    reserved_at=settle.reserved_at,
                    release_lease_id=settle.release_lease_id,
                    reservation_id=settle.reservation_id,
                    audited_at=settle.audited_at,
                )
            except LimiterUnavailable:
                self._on_outcome("failed")
                continue
            self._on_outcome("landed")
            log.info("settle_retried", request_id=settle.request_id, attempts=attempts)
            return
        self._give_up(settle, attempts, "reservation_expired")

    def _give_up(self, settle: PendingSettle, attempts: int, reason: str) -> None:
        self._on_outcome("gave_up")
        log.warning(
            "settle_given_up",
            request_id=settle.request_id,
            tenant_id=settle.tenant_id,
            key_id=settle.key_id,
            tokens=settle.actual,
            attempts=attempts,
            reason=reason,
        )

    async def aclose(self) -> None:
        """Stop every retry (shutdown): each still pending is given up, counted and logged."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # a cancellation of aclose itself still propagates (gather raises it)
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task.cancelled():
                self._on_outcome("gave_up")
                request_id = task.get_name().removeprefix("settle-retry-")
                log.warning("settle_given_up", request_id=request_id, reason="shutdown")
