"""Background loops stop deterministically, even when a cancellation is swallowed.

The swallowing is played by fakes whose await catches ``CancelledError`` and
returns (what 3.11's ``wait_for`` or a redis-py Cluster client can do): a
loop stopped only by ``cancel()`` would then run on and its ``stop()`` hang.
Each loop stops by its flag instead, and its owner's wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from neuronetz_gateway.adapters.tenant_weights import TenantWeights
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.proxy.fleet_discovery import FleetDiscovery
from neuronetz_gateway.stopping import stop_task, wait_set
from tests.unit.test_fleet_discovery import GPU1, FakeBoard, FakeChecker, FakeDirectory

BOUND = 5.0  # the tests' own bound: a stop that hangs fails here, not in the suite timeout


async def _swallowing_pause(seconds: float) -> None:
    """A pause whose cancellation is swallowed once (then it just returns)."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(seconds)


async def test_wait_set_never_swallows_a_cancellation_arriving_as_the_event_is_set() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_set(event, 10.0))
    await asyncio.sleep(0)  # the waiter waits
    event.set()
    waiter.cancel()  # in the same step: the race 3.11's wait_for loses
    await asyncio.wait({waiter}, timeout=BOUND)
    assert waiter.cancelled()


async def test_wait_set_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 10.0) is True


async def test_stop_task_ends_a_flagged_loop_whose_cancellation_was_swallowed() -> None:
    stopping = False
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while not stopping:
            rounds += 1
            await _swallowing_pause(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    stopping = True
    assert await asyncio.wait_for(stop_task(task, within=BOUND), BOUND + 1)
    assert task.done()


async def test_stop_task_gives_up_on_a_task_that_will_not_end() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await stop_task(task, within=0.05) is False  # returned: the caller is not hung
    release.set()
    await asyncio.wait({task}, timeout=BOUND)
    assert task.done()


class SwallowingChecker(FakeChecker):
    """Each check swallows a cancellation that lands in it (as redis-py did mid-command)."""

    def __init__(self, models: dict[str, tuple[str, ...] | None]) -> None:
        super().__init__(models)
        self.rounds_running = asyncio.Event()

    async def check(self, spec: BackendSpec) -> BackendStatus:
        if len(self.calls) >= 2:
            self.rounds_running.set()
        await _swallowing_pause(0.02)
        return await super().check(spec)


async def test_fleet_discovery_stops_though_a_round_swallowed_the_cancellation() -> None:
    checker = SwallowingChecker({"gpu1": ("llama3.2",)})
    discovery = FleetDiscovery(FakeDirectory(GPU1), checker, FakeBoard(), interval_seconds=0.01)
    await discovery.start()
    await asyncio.wait_for(checker.rounds_running.wait(), BOUND)
    await asyncio.wait_for(discovery.stop(), BOUND)
    calls = len(checker.calls)
    await asyncio.sleep(0.1)
    assert len(checker.calls) == calls  # no round after the stop


class SwallowingPool:
    """A Postgres pool whose query swallows a cancellation (and answers no weights)."""

    def __init__(self) -> None:
        self.queries = 0
        self.refreshing = asyncio.Event()

    @contextlib.asynccontextmanager
    async def acquire(self) -> Any:
        yield self

    async def fetch(self, _query: str) -> list[dict[str, int]]:
        self.queries += 1
        if self.queries >= 3:
            self.refreshing.set()
        await _swallowing_pause(0.02)
        return []


async def test_tenant_weights_stop_though_a_refresh_swallowed_the_cancellation() -> None:
    pool = SwallowingPool()
    weights = TenantWeights(pool, refresh_seconds=0.001)  # type: ignore[arg-type]
    await weights.start()
    await asyncio.wait_for(pool.refreshing.wait(), BOUND)
    await asyncio.wait_for(weights.stop(), BOUND)
    queries = pool.queries
    await asyncio.sleep(0.1)
    assert pool.queries == queries
