"""Stopping background loops deterministically.

On Python 3.11, ``asyncio.wait_for`` can swallow a cancellation that arrives
just as the awaited thing completes (it returns the result instead of raising
``CancelledError``), and redis-py's Cluster and Sentinel clients can swallow
one that lands mid-command. A ``while True`` loop stopped only by
``task.cancel()`` then runs on, and a ``stop()`` that awaits the task hangs
for good (the ledger beacon hung a teardown 120 s so, fixed in c29d0a0).

So every background loop here stops the same way: its condition is a flag
the owner sets before cancelling (a swallowed cancellation ends the loop at
its next check), its waits are woken by the owner where they can be, and the
owner waits for the task a bounded time only (:func:`stop_task`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from neuronetz_gateway.logging import get_logger

__all__ = ["stop_task", "wait_set"]

log = get_logger(__name__)


async def stop_task(task: asyncio.Task[Any] | asyncio.Future[Any] | None, *, within: float) -> bool:
    """Cancel ``task`` and wait for it at most ``within`` seconds; whether it ended.

    Its outcome is retrieved (a failure as it stopped is not news) and never
    raised here. One that does not end in time is logged and left to end on
    its own (its loop's flag is set: it does at its next check).
    """
    if task is None:
        return True
    task.cancel()
    await asyncio.wait({task}, timeout=within)
    if not task.done():
        name = task.get_name() if isinstance(task, asyncio.Task) else "future"
        log.warning("task_did_not_stop", task=name, waited_seconds=within)
        return False
    if not task.cancelled():
        task.exception()
    return True


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; whether it is set.

    Built on ``asyncio.timeout``, which (unlike 3.11's ``wait_for``) never
    turns a cancellation into a normal return.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
