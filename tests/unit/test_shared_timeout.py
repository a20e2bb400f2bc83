"""SharedTimeout behaves as asyncio.timeout for every use, with one timer for all of them.

Each scenario runs under both (parametrised), so what is asserted is that
they agree: a block past its deadline leaves with TimeoutError, one that
ends in time leaves untouched, a cancellation from elsewhere stays a
cancellation, a block that swallows the cancellation is not turned into a
timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from neuronetz_gateway.shared_timeout import SharedTimeout

Bound = Callable[[float], AbstractAsyncContextManager[Any]]
_SHARED: dict[float, SharedTimeout] = {}


def _shared(seconds: float) -> AbstractAsyncContextManager[Any]:
    return _SHARED.setdefault(seconds, SharedTimeout(seconds))()


BOUNDS = pytest.mark.parametrize("bound", [asyncio.timeout, _shared], ids=["asyncio", "shared"])


async def _run(bound: Bound, seconds: float, sleep: float) -> str:
    try:
        async with bound(seconds):
            await asyncio.sleep(sleep)
    except TimeoutError:
        return "timeout"
    return "done"


@BOUNDS
def test_each_use_times_out_at_its_own_deadline_among_many(bound: Bound) -> None:
    async def main() -> list[str]:
        # fast and slow uses interleaved, started one after another: the fast ones
        # (leaving in time) must not take the slow ones' timer with them, nor the reverse
        tasks = []
        for i in range(40):
            sleep = 5.0 if i % 3 == 0 else 0.0
            tasks.append(asyncio.create_task(_run(bound, 0.05, sleep)))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert results == ["timeout" if i % 3 == 0 else "done" for i in range(40)]


@BOUNDS
def test_a_use_that_ends_in_time_is_left_alone_and_later_ones_still_time_out(
    bound: Bound,
) -> None:
    async def main() -> tuple[str, str, str]:
        first = await _run(bound, 0.05, 0.0)
        await asyncio.sleep(0.1)  # past the first use's deadline: its timer (if any) fired
        second = await _run(bound, 0.05, 0.0)
        third = await _run(bound, 0.05, 1.0)
        return first, second, third

    assert asyncio.run(main()) == ("done", "done", "timeout")


@BOUNDS
def test_a_cancellation_from_elsewhere_stays_a_cancellation(bound: Bound) -> None:
    async def main() -> str:
        task = asyncio.create_task(_run(bound, 5.0, 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "not cancelled"

    assert asyncio.run(main()) == "cancelled"


@BOUNDS
def test_a_block_that_swallows_the_cancellation_is_not_a_timeout(bound: Bound) -> None:
    async def main() -> str:
        async with bound(0.02):
            try:
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                return "swallowed"
        return "ended"

    assert asyncio.run(main()) == "swallowed"


@BOUNDS
def test_the_timeout_error_chains_the_cancellation(bound: Bound) -> None:
    async def main() -> BaseException | None:
        try:
            async with bound(0.01):
                await asyncio.sleep(5.0)
        except TimeoutError as exc:
            return exc.__cause__
        return None

    assert isinstance(asyncio.run(main()), asyncio.CancelledError)


def test_one_instance_serves_successive_event_loops() -> None:
    shared = SharedTimeout(0.02)

    async def once() -> str:
        return await _run(lambda _: shared(), 0.02, 1.0)

    assert asyncio.run(once()) == "timeout"
    assert asyncio.run(once()) == "timeout"  # the first loop's timer is not relied on


def test_a_use_is_entered_once_and_only_in_a_task() -> None:
    shared = SharedTimeout(1.0)
    with pytest.raises(ValueError, match="positive"):
        SharedTimeout(0)

    async def twice() -> None:
        bound = shared()
        async with bound:
            pass
        async with bound:
            pass

    with pytest.raises(RuntimeError, match="entered already"):
        asyncio.run(twice())


@BOUNDS
def test_a_timeout_leaves_the_task_with_no_cancellation_pending(bound: Bound) -> None:
    async def main() -> tuple[str, int]:
        result = await _run(bound, 0.01, 5.0)
        task = asyncio.current_task()
        assert task is not None
        return result, task.cancelling()

    assert asyncio.run(main()) == ("timeout", 0)
