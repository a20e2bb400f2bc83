"""The backend pool against real simulators (one per "GPU") and the real Redis.

Two :class:`BackendPool` objects on two Redis clients stand for two proxy
replicas. The simulators model GPUs (``--slots``, ``--load-seconds``,
``/api/ps``); their own counters (``peak_active``, ``loads``) are the truth a
test checks the pool against. Every test uses backend names of its own, so
the slot state in Redis is never shared between tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_slots import SlotAdmission
from neuronetz_gateway.devstack.servers import free_port
from neuronetz_gateway.domain.model_call import ModelCall
from neuronetz_gateway.domain.routing import rendezvous_order
from neuronetz_gateway.proxy.pool import BackendPool, PoolMember, PoolMetrics, StaticFleet
from neuronetz_gateway.proxy.refusals import Refusal
from tests.support.proxy_stack import SimulatorServer, running_simulator

pytestmark = pytest.mark.integration

LLAMA = "llama3.2:latest"
QWEN = "qwen2.5:0.5b"
CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}'


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimulatorServer]]:
    """Three GPUs: ``warm`` has llama loaded (and qwen installed), ``cold`` has both
    installed only, ``other`` has only qwen, loaded. The simulators would run 8 at once;
    the pool gives each 2 slots. 20 chunks of 5 ms (about 0.1 s a request)."""
    common = {"NZ_SIM_SLOTS": "8", "NZ_SIM_CHUNK_DELAY_MS": "5", "NZ_SIM_LOAD_SECONDS": "0.3"}
    with (
        running_simulator(**common, NZ_SIM_MODELS=f"{LLAMA},{QWEN}", NZ_SIM_LOADED=LLAMA) as warm,
        running_simulator(**common, NZ_SIM_MODELS=f"{LLAMA},{QWEN}") as cold,
        running_simulator(**common, NZ_SIM_MODELS=QWEN, NZ_SIM_LOADED=QWEN) as other,
    ):
        yield {"warm": warm, "cold": cold, "other": other}


@pytest.fixture(autouse=True)
def _fresh_sims(sims: dict[str, SimulatorServer]) -> None:
    for sim in sims.values():
        sim.reset()


def members(sims: dict[str, SimulatorServer], suffix: str, **changes: Any) -> list[PoolMember]:
    """The three simulators as pool members, named ``<role>-<suffix>``."""
    known = {
        "warm": (frozenset({LLAMA, QWEN}), frozenset({LLAMA})),
        "cold": (frozenset({LLAMA, QWEN}), frozenset()),
        "other": (frozenset({QWEN}), frozenset({QWEN})),
    }
    out = []
    for role, (installed, loaded) in known.items():
        fields: dict[str, Any] = {
            "slots": 2,
            "installed": installed,
            "loaded": loaded,
            **changes.get(role, {}),
        }
        out.append(PoolMember(f"{role}-{suffix}", sims[role].url, **fields))
    return out


class Replica:
    """One proxy replica's pool (its own Redis client, slots and metrics)."""

    def __init__(
        self,
        pool: BackendPool,
        fleet: StaticFleet,
        registry: CollectorRegistry,
        slots: SlotAdmission,
    ) -> None:
        self.pool = pool
        self.slots = slots
        self.fleet = fleet
        self.registry = registry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_replica(redis_test_url: str, redis_prefix: str) -> AsyncIterator[Any]:
    opened: list[Any] = []

    async def make(fleet_members: list[PoolMember], **options: Any) -> Replica:
        client = await open_redis(redis_test_url, timeout_seconds=5.0)
        slots = SlotAdmission(client, prefix=redis_prefix, timeout_seconds=5.0, poll_seconds=0.5)
        registry = CollectorRegistry()
        fleet = StaticFleet(fleet_members, open_seconds=60)
        options.setdefault("queue_timeout_seconds", 30.0)
        pool = BackendPool(
            fleet, slots, metrics=PoolMetrics(registry), lease_ttl_seconds=30.0, **options
        )
        opened.append((client, slots, pool))
        return Replica(pool, fleet, registry, slots)

    yield make
    for client, slots, pool in opened:
        await pool.aclose()
        await slots.aclose()
        await close_redis(client)


def call(model: str | None = LLAMA, *, session: str | None = None, tenant: int = 1) -> ModelCall:
    return ModelCall(
        route="chat",
        surface="native",
        tenant_id=tenant,
        key_id=1,
        request_id=secrets.token_hex(8),
        model=model,
        session=session,
        stream=True,
    )


async def chat(pool: BackendPool, body: bytes = CHAT, **kw: Any) -> tuple[str, bytes]:
    """One streamed chat through the pool: (backend address, whole body)."""
    stream = await pool.open(call(**kw), "/api/chat", body)
    try:
        data = b"".join([chunk async for chunk in stream.chunks()])
    except BaseException:
        stream.abort()
        raise
    stream.release()
    assert stream.status == 200, data
    return stream.backend, data


async def test_a_model_goes_to_a_backend_that_has_it_the_loaded_one_first(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    replica = await make_replica(members(sims, secrets.token_hex(3)))
    backend, body = await chat(replica.pool)
    assert backend == sims["warm"].url
    assert b'"done":true' in body
    qwen = b'{"model":"qwen2.5:0.5b","messages":[{"role":"user","content":"hi"}],"stream":true}'
    for _ in range(3):
        backend, _ = await chat(replica.pool, qwen, model=QWEN)
        assert backend == sims["other"].url  # the one with qwen loaded
    assert sims["cold"].forwarded() == []  # never a cold load while a warm slot is free
    assert (
        replica.metric(
            "nz_proxy_pool_queue_wait_seconds_count", backend=f"warm-{replica_suffix(replica)}"
        )
        >= 1
    )


def replica_suffix(replica: Replica) -> str:
    return replica.fleet.members()[0].name.split("-", 1)[1]


QWEN_CHAT = b'{"model":"qwen2.5:0.5b","messages":[{"role":"user","content":"hi"}],"stream":true}'


async def test_a_model_sent_to_a_one_model_backend_takes_it_off_for_the_model_it_evicts(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    """The poll still shows llama on ``warm`` after the pool sent it qwen (which evicts
    llama on a backend seen holding one model): llama goes to the other backend, though
    ``warm`` has the most free slots by that stale view."""
    suffix = secrets.token_hex(3)
    warm, cold, _ = members(
        sims,
        suffix,
        warm={"slots": 4},
        cold={"installed": frozenset({LLAMA}), "loaded": frozenset({LLAMA})},
    )
    replica = await make_replica([warm, cold])
    qwen = await replica.pool.open(call(QWEN), "/api/chat", QWEN_CHAT)  # only warm has it
    assert qwen.backend == sims["warm"].url
    try:
        for _ in range(2):
            backend, _ = await chat(replica.pool)
            assert backend == sims["cold"].url
    finally:
        qwen.abort()
    assert [r["body"]["model"] for r in sims["warm"].forwarded()] == ["qwen2.5:0.5b"]


async def test_a_short_wait_where_the_model_is_loaded_beats_a_load_on_a_free_backend(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    """``warm`` has llama loaded and its one slot held; ``cold`` is free but must load
    llama. One request's wait is shorter than a load (the pool's first guesses: 2 s
    against 5 s), so the call queues on ``warm`` rather than take the free slot."""
    suffix = secrets.token_hex(3)
    warm, cold, _ = members(sims, suffix, warm={"slots": 1})
    replica = await make_replica([warm, cold])
    holding = await replica.pool.open(call(), "/api/chat", CHAT)
    assert holding.backend == sims["warm"].url
    waiting = asyncio.ensure_future(chat(replica.pool, tenant=2))
    deadline = time.monotonic() + 5
    while not (await replica.slots.state(warm.name, capacity=1)).queued:
        assert time.monotonic() < deadline, "the second call never queued on warm"
        await asyncio.sleep(0.02)
    holding.abort()
    backend, _ = await asyncio.wait_for(waiting, 10)
    assert backend == sims["warm"].url
    assert sims["cold"].forwarded() == []


async def test_a_session_sticks_to_its_backend(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    """Both backends have the model loaded and free slots: each session goes to its
    rendezvous-hash backend, every time."""
    both_warm = {"cold": {"loaded": frozenset({LLAMA})}}
    fleet = members(sims, secrets.token_hex(3), **both_warm)
    replica = await make_replica(fleet)
    able = [(m.name, m.weight) for m in fleet if LLAMA in m.installed]
    url = {m.name: m.url for m in fleet}
    for session in ("alpha", "beta", "gamma", "delta", "eps", "zeta"):
        expected = url[rendezvous_order(f"t1:{session}", able)[0]]
        for _ in range(3):
            backend, _ = await chat(replica.pool, session=session)
            assert backend == expected, session


async def test_fifty_requests_on_two_replicas_never_exceed_two_slots_per_backend(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    """Two backends of 2 slots (the simulators would run 8): at most 4 run at once,
    the rest wait, all 50 complete."""
    suffix = secrets.token_hex(3)
    both_warm = {"cold": {"loaded": frozenset({LLAMA})}}
    fleet = [m for m in members(sims, suffix, **both_warm) if not m.name.startswith("other")]
    replicas = [await make_replica(fleet), await make_replica(fleet)]
    results = await asyncio.gather(*(chat(replicas[i % 2].pool) for i in range(50)))
    assert len(results) == 50
    assert all(b'"done":true' in body for _, body in results)
    for role in ("warm", "cold"):
        stats = sims[role].stats()
        assert stats["peak_active"] <= 2, (role, stats)
    assert sims["warm"].stats()["completed"] + sims["cold"].stats()["completed"] == 50
    waited = sum(
        r.metric("nz_proxy_pool_queue_wait_seconds_count", backend=m.name)
        for r in replicas
        for m in fleet
    )
    assert waited == 50


async def test_a_dead_backend_fails_over_before_the_first_byte(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    dead = PoolMember(
        f"dead-{suffix}",
        f"http://127.0.0.1:{free_port()}",
        4,  # the most free slots: first even once llama is loaded where it failed over to
        installed=frozenset({LLAMA}),
        loaded=frozenset({LLAMA}),
    )
    fleet = [dead, *members(sims, suffix, warm={"loaded": frozenset()})]
    replica = await make_replica(fleet)
    for _ in range(4):
        backend, body = await chat(replica.pool)
        assert backend != dead.url
        assert b'"done":true' in body
    assert replica.metric("nz_proxy_pool_errors_total", backend=dead.name, kind="connect") >= 1
    # the breaker opened after three failures: the dead backend is not tried any more
    assert not next(m for m in replica.fleet.members() if m.name == dead.name).healthy


async def test_a_busy_backends_503_fails_over_once(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    sims["warm"].configure(failure="busy")
    replica = await make_replica(members(sims, secrets.token_hex(3)))
    sent_to: list[str] = []
    asked = call()
    asked.on_sent = sent_to.append  # how the exchange learns the backend (its metrics)
    stream = await replica.pool.open(asked, "/api/chat", CHAT)
    _ = [chunk async for chunk in stream.chunks()]
    stream.release()
    assert stream.backend == sims["cold"].url
    warm = f"warm-{replica_suffix(replica)}"
    assert sent_to == [warm, f"cold-{replica_suffix(replica)}"]  # in flight moves on failover
    assert replica.metric("nz_proxy_pool_failovers_total", backend=warm) == 1


async def test_the_last_candidates_error_reaches_the_client_as_its_own(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    sims["warm"].configure(failure="busy")
    sims["cold"].configure(failure="busy")
    replica = await make_replica(members(sims, secrets.token_hex(3)))
    stream = await replica.pool.open(call(), "/api/chat", CHAT)
    assert stream.status == 503  # the pipeline translates it into the surface's error
    await stream.read()
    stream.release()


async def test_all_backends_down_is_a_503_at_once(make_replica: Any) -> None:
    suffix = secrets.token_hex(3)
    dead = [
        PoolMember(
            f"d{i}-{suffix}", f"http://127.0.0.1:{free_port()}", 2, installed=frozenset({LLAMA})
        )
        for i in range(2)
    ]
    replica = await make_replica(dead)
    started = time.monotonic()
    with pytest.raises(Refusal) as caught:
        await replica.pool.open(call(), "/api/chat", CHAT)
    assert caught.value.status == 503
    assert caught.value.retry_after == 1
    assert time.monotonic() - started < 5  # in practice milliseconds: refused connections
    assert not await replica.pool.ping()


async def test_a_drained_backend_takes_nothing_new(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    replica = await make_replica(members(sims, suffix, warm={"active": False}))
    for _ in range(3):
        backend, _ = await chat(replica.pool)
        assert backend == sims["cold"].url
    assert sims["warm"].forwarded() == []


async def test_a_call_queued_on_a_backend_drained_meanwhile_goes_elsewhere(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    warm, cold, _ = members(sims, suffix, warm={"slots": 1})
    replica = await make_replica([warm])
    holding = await replica.pool.open(call(), "/api/chat", CHAT)  # holds warm's only slot
    waiting = asyncio.ensure_future(chat(replica.pool, tenant=2))
    deadline = time.monotonic() + 5
    while not (await replica.slots.state(warm.name, capacity=1)).queued:
        assert time.monotonic() < deadline, "the second call never queued"
        await asyncio.sleep(0.02)
    replica.fleet.set_members(
        [dataclasses.replace(warm, active=False), cold]
    )  # the operator drains warm, adds cold
    holding.abort()  # warm's slot comes free: its queue's head must not run there
    backend, _ = await asyncio.wait_for(waiting, 10)
    assert backend == sims["cold"].url
    assert len(sims["warm"].forwarded()) == 1  # the holder's only


async def test_queue_timeout_is_a_503_with_retry_after_and_frees_the_slot_after(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    one = [m for m in members(sims, suffix, warm={"slots": 1}) if m.name.startswith("warm")]
    replica = await make_replica(one, queue_timeout_seconds=0.5)
    holding = await replica.pool.open(call(), "/api/chat", CHAT)  # holds the only slot
    with pytest.raises(Refusal) as caught:
        await replica.pool.open(call(tenant=2), "/api/chat", CHAT)
    assert caught.value.status == 503
    assert caught.value.retry_after == 1
    holding.abort()  # the client left: its slot comes back
    backend, _ = await chat(replica.pool)
    assert backend == sims["warm"].url


async def test_a_backend_added_while_traffic_runs_takes_requests(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    every = members(sims, suffix, cold={"loaded": frozenset({LLAMA})})
    replica = await make_replica([every[0]])
    running = [asyncio.ensure_future(chat(replica.pool)) for _ in range(6)]
    replica.fleet.set_members(every[:2])  # the operator added a backend
    later = await asyncio.gather(*(chat(replica.pool) for _ in range(6)))
    await asyncio.gather(*running)
    assert sims["cold"].url in {backend for backend, _ in later}
    replica.fleet.set_members(every[1:2])  # and removed the first
    for _ in range(3):
        backend, _ = await chat(replica.pool)
        assert backend == sims["cold"].url


async def test_cold_loads_and_speed_are_counted_per_backend(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    suffix = secrets.token_hex(3)
    only_cold = [m for m in members(sims, suffix) if m.name.startswith("cold")]
    replica = await make_replica(only_cold)
    await chat(replica.pool)  # the first one loads the model (0.3 s)
    await chat(replica.pool)
    name = only_cold[0].name
    assert sims["cold"].stats()["loads"] == 1
    assert replica.metric("nz_proxy_pool_cold_loads_total", backend=name) == 1
    assert replica.metric("nz_proxy_pool_tokens_per_second_count", backend=name) == 2


async def test_calls_for_no_model_go_to_any_healthy_backend(
    make_replica: Any, sims: dict[str, SimulatorServer]
) -> None:
    replica = await make_replica(members(sims, secrets.token_hex(3)))
    stream = await replica.pool.open(call(None), "/api/version", None)
    assert stream.status == 200
    assert b"version" in await stream.read()
    stream.release()
    assert await replica.pool.ping()
