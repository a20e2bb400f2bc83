"""The fleet's adapters on the real things: the board on every Redis deployment, the
directory on Postgres' LISTEN, the checks against the simulator over HTTP."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from neuronetz_gateway.adapters.backend_board import BackendBoard
from neuronetz_gateway.adapters.backend_check import HttpBackendChecker
from neuronetz_gateway.adapters.backend_directory import BackendDirectory, environment_backend
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.devstack.servers import free_port
from neuronetz_gateway.devstack.stack import DevBackend, fleet_models, register_dev_backends
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec, BackendState
from neuronetz_gateway.proxy.fleet_discovery import FleetDiscovery
from tests.conftest import unique
from tests.support.proxy_stack import SimulatorServer, running_simulator
from tests.support.redis_deployments import RedisDeployment

pytestmark = pytest.mark.integration


async def test_the_board_on_every_deployment(
    redis_deployment: RedisDeployment, redis_prefix: str
) -> None:
    client = await open_redis(redis_deployment.url, ca_file=redis_deployment.ca_file)
    try:
        board = BackendBoard(client, prefix=f"{redis_prefix}{secrets.token_hex(2)}")
        assert await board.claim_check("gpu1", "replica-a", 5_000)
        assert not await board.claim_check("gpu1", "replica-b", 5_000)
        assert await board.claim_check("gpu{2}", "replica-b", 5_000)  # braces in a name
        statuses = [
            BackendStatus(name=n, url="http://h:1", checked_at=time.time(), reachable=True)
            for n in ("gpu1", "gpu{2}")
        ]
        for status in statuses:
            await board.publish(status, 5_000)
        assert await board.read(["gpu1", "gpu{2}", "gpu3"]) == {s.name: s for s in statuses}
        if isinstance(client, RedisCluster):  # one MGET: every key in one slot
            keys = [board.status_key("gpu1"), board.status_key("gpu{2}"), board.check_key("x")]
            assert len({client.keyslot(k) for k in keys}) == 1
    finally:
        await close_redis(client)


async def test_the_directory_follows_the_table_within_a_second(
    database_url: str, store: Store
) -> None:
    fallback = environment_backend("http://127.0.0.1:11434/", 4)
    directory = BackendDirectory(store.backend_specs, fallback, database_url=database_url)
    await directory.start()
    try:
        assert await directory.wait_listening(5.0)
        assert directory.backends == (fallback,) and not directory.from_database
        assert fallback.name == "default" and fallback.url == "http://127.0.0.1:11434"
        name = unique("gpu")
        version = directory.version
        await store.add_backend(BackendSpec.checked(name, "http://10.0.0.5:11434", 2))
        assert await directory.wait_for_change(version, within=1.0)
        assert [b.name for b in directory.backends] == [name]
        version = directory.version
        await store.set_backend_state(name, BackendState.DRAINING)
        assert await directory.wait_for_change(version, within=1.0)
        assert directory.backends[0].state is BackendState.DRAINING
        version = directory.version
        await store.remove_backend(name)
        assert await directory.wait_for_change(version, within=1.0)
        assert directory.backends == (fallback,)
    finally:
        await directory.stop()


@pytest.fixture(scope="module")
def gpu_sim() -> Iterator[SimulatorServer]:
    with running_simulator(NZ_SIM_MODELS="llama3.2,mistral", NZ_SIM_LOADED="mistral") as sim:
        yield sim


class _Directory:
    def __init__(self, *backends: BackendSpec) -> None:
        self.backends = backends

    def on_change(self, callback: object) -> None:
        del callback


async def test_checks_over_http_feed_the_catalogue(
    gpu_sim: SimulatorServer, redis_test_url: str, redis_prefix: str
) -> None:
    up = BackendSpec("up", gpu_sim.url, 2)
    down = BackendSpec("down", f"http://127.0.0.1:{free_port()}", 2)
    client = await open_redis(redis_test_url)
    checker = HttpBackendChecker(timeout_seconds=2.0)
    await checker.open()
    try:
        board = BackendBoard(client, prefix=f"{redis_prefix}{secrets.token_hex(2)}")
        fleet = FleetDiscovery(_Directory(up, down), checker, board, interval_seconds=1.0)
        catalogue = await fleet.catalogue()
        assert set(catalogue.entries) == {"llama3.2:latest", "mistral:latest"}
        health = fleet.health()
        assert health["up"].loaded == {"mistral:latest"}
        status = health["down"].status
        assert status is not None and not status.reachable and status.error == "connect_error"
        shared = await board.read(["up", "down"])  # what `backend list` shows
        assert shared["up"].installed == ("llama3.2:latest", "mistral:latest")
        assert not shared["down"].reachable
    finally:
        await checker.close()
        await close_redis(client)


async def test_dev_registers_its_simulated_fleet_replacing_an_earlier_one(
    database_url: str, store: Store
) -> None:
    first = [
        DevBackend(f"sim{i}", f"http://127.0.0.1:{11435 + i}", fleet_models(i), "x") for i in (1, 2)
    ]
    await register_dev_backends(database_url, first)
    second = first[:1]
    await register_dev_backends(database_url, second)  # a reused database: sim2 goes
    try:
        sims = [b for b in await store.backend_specs() if b.name.startswith("sim")]
        assert [(b.name, b.url, b.slots) for b in sims] == [("sim1", "http://127.0.0.1:11436", 2)]
    finally:
        await register_dev_backends(database_url, [])
    assert not [b for b in await store.backend_specs() if b.name.startswith("sim")]


def test_the_simulated_fleet_shares_its_models_out() -> None:
    sets = [fleet_models(i) for i in range(3)]
    assert sets == [
        ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest"),
        ("qwen2.5:0.5b", "mistral:latest", "nomic-embed-text:latest"),
        ("mistral:latest", "phi3:mini", "nomic-embed-text:latest"),
    ]
