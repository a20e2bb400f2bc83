"""Backend slot leases and the fair queue against a real Redis, on every deployment.

Two :class:`SlotAdmission` objects on two redis-py clients stand for two
proxy replicas. Each test uses its own random backend names under the run's
prefix, so tests share the session Redis without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_slots import QueueTimeout, SlotAdmission, SlotLease
from tests.support.redis_deployments import RedisDeployment

pytestmark = pytest.mark.integration

MakeSlots = Callable[..., Awaitable[SlotAdmission]]


class Queued:
    """An ``on_queued`` callback that counts the requests that had to wait."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def __call__(self, position: int) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, n: int) -> None:
        """Until ``n`` requests have been queued."""
        while self.count < n:
            self._changed.clear()
            await self._changed.wait()


def backend_name() -> str:
    return "gpu-" + secrets.token_hex(4)


@pytest.fixture
async def make_slots(
    redis_deployment: RedisDeployment, redis_prefix: str
) -> AsyncIterator[MakeSlots]:
    """``await make()`` builds one "replica": its own Redis client and SlotAdmission."""
    clients: list[RedisClient] = []
    made: list[SlotAdmission] = []

    async def make(**options: Any) -> SlotAdmission:
        # exactness, not latency: a loaded box must not turn a slow reply into an error
        options.setdefault("timeout_seconds", 10.0)
        client = await open_redis(
            redis_deployment.url, ca_file=redis_deployment.ca_file, timeout_seconds=5.0
        )
        clients.append(client)
        slots = SlotAdmission(client, prefix=redis_prefix, **options)
        made.append(slots)
        return slots

    yield make
    for slots in made:
        await slots.aclose()
    for client in clients:
        await close_redis(client)


async def test_a_free_slot_is_granted_at_once_and_a_full_backend_queues(
    make_slots: MakeSlots,
) -> None:
    slots = await make_slots()
    gpu = backend_name()
    first = await slots.acquire(gpu, capacity=2, tenant="t1", queue_timeout=5)
    second = await slots.acquire(gpu, capacity=2, tenant="t1", queue_timeout=5)
    assert first.waited == 0 and second.waited == 0
    assert (await slots.state(gpu, capacity=2)).held == 2

    positions: list[int] = []
    queued = Queued()

    def on_queued(position: int) -> None:
        positions.append(position)
        queued(position)

    third = asyncio.ensure_future(
        slots.acquire(gpu, capacity=2, tenant="t2", queue_timeout=10, on_queued=on_queued)
    )
    await queued.reach(1)
    assert positions == [0]
    assert not third.done()
    assert (await slots.state(gpu, capacity=2)).queued == 1

    await slots.release(first, capacity=2)
    lease = await third
    assert lease.lease_id != first.lease_id
    state = await slots.state(gpu, capacity=2)
    assert (state.held, state.queued) == (2, 0)
    for held in (second, lease):
        await slots.release(held, capacity=2)
    assert (await slots.state(gpu, capacity=2)).held == 0


async def test_fifty_requests_on_two_replicas_never_exceed_the_slots_and_none_is_lost(
    make_slots: MakeSlots,
) -> None:
    """Two backends of 2 slots, 50 concurrent requests through two replicas: at most 2 per
    backend (4 in all) run at once, the others wait, every one of them runs."""
    replicas = [await make_slots(), await make_slots()]
    backends = [backend_name(), backend_name()]
    running = dict.fromkeys(backends, 0)
    peak = dict.fromkeys(backends, 0)
    peak_total = 0
    done = 0

    async def request(i: int) -> None:
        nonlocal peak_total, done
        slots = replicas[i % 2]
        backend = backends[(i // 2) % 2]
        lease = await slots.acquire(backend, capacity=2, tenant=f"t{i % 3}", queue_timeout=60)
        running[backend] += 1
        peak[backend] = max(peak[backend], running[backend])
        peak_total = max(peak_total, sum(running.values()))
        try:
            await asyncio.sleep(random.uniform(0.005, 0.03))  # the model "runs"
        finally:
            running[backend] -= 1
            await slots.release(lease, capacity=2)
        done += 1

    await asyncio.gather(*(request(i) for i in range(50)))
    assert done == 50
    assert max(peak.values()) == 2  # full, never over
    assert peak_total <= 4
    for backend in backends:
        state = await replicas[0].state(backend, capacity=2)
        assert (state.held, state.queued) == (0, 0)


async def test_a_waiter_that_times_out_leaves_the_queue(make_slots: MakeSlots) -> None:
    slots = await make_slots()
    gpu = backend_name()
    held = await slots.acquire(gpu, capacity=1, tenant="t1", queue_timeout=5)
    with pytest.raises(QueueTimeout) as caught:
        await slots.acquire(gpu, capacity=1, tenant="t2", queue_timeout=0.3)
    assert caught.value.backend == gpu
    assert caught.value.waited >= 0.3
    assert (await slots.state(gpu, capacity=1)).queued == 0
    await slots.release(held, capacity=1)
    assert (await slots.state(gpu, capacity=1)).held == 0


async def test_a_client_that_leaves_while_queued_gives_its_place_to_the_next(
    make_slots: MakeSlots,
) -> None:
    a, b = await make_slots(), await make_slots()
    gpu = backend_name()
    held = await a.acquire(gpu, capacity=1, tenant="t1", queue_timeout=5)
    queued = Queued()
    leaving = asyncio.ensure_future(
        a.acquire(gpu, capacity=1, tenant="t2", queue_timeout=30, on_queued=queued)
    )
    await queued.reach(1)
    staying = asyncio.ensure_future(
        b.acquire(gpu, capacity=1, tenant="t3", queue_timeout=30, on_queued=queued)
    )
    await queued.reach(2)
    assert (await a.state(gpu, capacity=1)).queued == 2
    leaving.cancel()  # the client went away
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    assert (await a.state(gpu, capacity=1)).queued == 1
    await a.release(held, capacity=1)
    lease = await staying  # the place behind the one that left
    await b.release(lease, capacity=1)


async def test_a_slot_handed_to_a_waiter_that_just_left_goes_on_to_the_next(
    make_slots: MakeSlots,
) -> None:
    """The release hands the slot to the queue's head inside its script; if that waiter
    leaves before it takes the slot, its give-back (what a cancelled acquire does on its
    way out) passes the slot on. The leaving waiter is driven by hand here, so it cannot
    take the slot before it leaves."""
    slots = await make_slots()
    gpu = backend_name()
    held = await slots.acquire(gpu, capacity=1, tenant="t1", queue_timeout=5)
    reply = await slots._script(gpu, "acquire", 1, "leaver", "t2", "1.0")
    leaver = SlotLease(gpu, reply[1].decode())
    queued = Queued()
    staying = asyncio.ensure_future(
        slots.acquire(gpu, capacity=1, tenant="t3", queue_timeout=30, on_queued=queued)
    )
    await queued.reach(1)
    await slots.release(held, capacity=1)  # handed to the head (the leaver) in the script
    state = await slots.state(gpu, capacity=1)
    assert (state.held, state.queued) == (1, 1)
    assert not staying.done()
    await slots.release(leaver, capacity=1)  # it left without taking the slot
    lease = await staying
    assert (await slots.state(gpu, capacity=1)).held == 1
    await slots.release(lease, capacity=1)


async def test_a_crashed_replicas_slot_and_ticket_come_back_after_their_ttl(
    make_slots: MakeSlots,
) -> None:
    crashed = await make_slots(lease_ttl_seconds=0.4, grace_seconds=0.4, poll_seconds=0.1)
    alive = await make_slots(lease_ttl_seconds=30, grace_seconds=0.4, poll_seconds=0.1)
    gpu = backend_name()
    # the crashed replica held the only slot and had one more request queued; neither is
    # ever renewed, polled or released
    await crashed.acquire(gpu, capacity=1, tenant="t1", queue_timeout=5)
    await crashed._script(gpu, "acquire", 1, "ghost", "t1", "1.0")  # queued, then silent
    lease = await alive.acquire(gpu, capacity=1, tenant="t2", queue_timeout=20)
    assert lease.waited > 0
    state = await alive.state(gpu, capacity=1)
    assert (state.held, state.queued) == (1, 0)
    await alive.release(lease, capacity=1)


async def test_renewal_extends_a_lease_and_never_revives_an_expired_one(
    make_slots: MakeSlots,
) -> None:
    """On a settable clock (Redis judges expiry by the time the replica sends)."""
    now = [time.time()]
    slots = await make_slots(
        lease_ttl_seconds=10, grace_seconds=5, poll_seconds=1, clock=lambda: now[0]
    )
    gpu = backend_name()
    lease = await slots.acquire(gpu, capacity=1, tenant="t1", queue_timeout=5)
    for _ in range(4):
        now[0] += 6  # past the first TTL after two steps
        assert await slots.renew(lease)
    assert (await slots.state(gpu, capacity=1)).held == 1
    assert not await slots.renew(SlotLease(gpu, "never-held"))
    now[0] += 11  # not renewed for longer than the TTL: gone, and renewal does not revive it
    assert (await slots.state(gpu, capacity=1)).held == 0
    assert not await slots.renew(lease)
    await slots.release(lease, capacity=1)


async def _light_tenant_waits(
    slots: SlotAdmission, *, service: float, light_requests: int
) -> tuple[list[float], list[int]]:
    """A heavy tenant keeps 32 requests in flight on a 4-slot backend while a light one
    sends one at a time. Returns the light requests' waits and, for each, how many heavy
    requests got a slot while it waited."""
    gpu = backend_name()
    grants: list[str] = []
    stop = asyncio.Event()

    queued = Queued()

    async def heavy() -> None:
        while not stop.is_set():
            lease = await slots.acquire(
                gpu, capacity=4, tenant="heavy", queue_timeout=120, on_queued=queued
            )
            grants.append("heavy")
            await asyncio.sleep(service)
            await slots.release(lease, capacity=4)

    workers = [asyncio.ensure_future(heavy()) for _ in range(32)]
    await queued.reach(28)
    waits: list[float] = []
    overtaken: list[int] = []
    try:
        for _ in range(light_requests):
            before = len(grants)
            lease = await slots.acquire(gpu, capacity=4, tenant="light", queue_timeout=120)
            overtaken.append(len(grants) - before)
            waits.append(lease.waited)
            await asyncio.sleep(service)
            await slots.release(lease, capacity=4)
    finally:
        stop.set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return waits, overtaken


@pytest.mark.parametrize("redis_deployment", ["single"], indirect=True)
async def test_a_light_tenant_does_not_wait_behind_a_heavy_tenants_backlog(
    make_slots: MakeSlots,
) -> None:
    """Fair queuing: the light tenant is overtaken by at most the slots already handed
    out when it arrived (4) plus one; in arrival order (FIFO) by the whole backlog (~28).
    The waits, in units of one request's service time, are printed for the note."""
    service = 0.05
    fair, fair_overtaken = await _light_tenant_waits(
        await make_slots(), service=service, light_requests=8
    )
    fifo, fifo_overtaken = await _light_tenant_waits(
        await make_slots(fair=False), service=service, light_requests=3
    )
    assert max(fair_overtaken) <= 5
    assert min(fifo_overtaken) >= 20
    fair_p = max(fair) / service
    fifo_p = statistics.median(fifo) / service
    print(
        f"\nlight tenant's queue wait / service time: fair max {fair_p:.2f} "
        f"(median {statistics.median(fair) / service:.2f}), FIFO median {fifo_p:.2f}; "
        f"overtaken by heavy: fair {fair_overtaken}, FIFO {fifo_overtaken}"
    )


async def test_slots_on_many_backends_stay_apart(make_slots: MakeSlots) -> None:
    """Each backend's keys live under its own hash tag; a full backend does not hold up
    another (on a Cluster they sit on different nodes)."""
    slots = await make_slots()
    names = [backend_name() for _ in range(6)]
    leases = [await slots.acquire(n, capacity=1, tenant="t", queue_timeout=5) for n in names]
    started = time.monotonic()
    for n, lease in zip(names, leases, strict=True):
        assert (await slots.state(n, capacity=1)).held == 1
        await slots.release(lease, capacity=1)
    assert time.monotonic() - started < 30
