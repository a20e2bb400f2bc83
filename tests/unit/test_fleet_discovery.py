"""Per-backend discovery and health on fakes of its ports: checker, board, directory, clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest

from neuronetz_gateway.adapters.backend_board import BoardUnavailable
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec, BackendState
from neuronetz_gateway.domain.circuit_breaker import BreakerPolicy, CircuitState, Outcome
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.proxy.discovery import DiscoveryFailed
from neuronetz_gateway.proxy.fleet_discovery import FleetDiscovery

GPU1 = BackendSpec("gpu1", "http://gpu1:11434", 4)
GPU2 = BackendSpec("gpu2", "http://gpu2:11434", 2)


class FakeDirectory:
    def __init__(self, *backends: BackendSpec) -> None:
        self.backends = tuple(backends)
        self._callbacks: list[Callable[[tuple[BackendSpec, ...]], None]] = []

    def on_change(self, callback: Callable[[tuple[BackendSpec, ...]], None]) -> None:
        self._callbacks.append(callback)

    def change(self, *backends: BackendSpec) -> None:
        self.backends = tuple(backends)
        for callback in self._callbacks:
            callback(self.backends)


class FakeChecker:
    """Answers per backend name: installed models, or ``None`` for unreachable."""

    def __init__(self, models: dict[str, tuple[str, ...] | None]) -> None:
        self.models = models
        self.calls: list[str] = []

    async def check(self, spec: BackendSpec) -> BackendStatus:
        self.calls.append(spec.name)
        installed = self.models.get(spec.name)
        if installed is None:
            return BackendStatus(
                name=spec.name,
                url=spec.url,
                checked_at=time.time() + len(self.calls) * 1e-6,
                reachable=False,
                error="connect_error",
            )
        return BackendStatus(
            name=spec.name,
            url=spec.url,
            checked_at=time.time() + len(self.calls) * 1e-6,
            reachable=True,
            installed=tuple(canonical_model(m) for m in installed),  # as the real checker
            loaded=tuple(canonical_model(m) for m in installed[:1]),
            tags=tuple({"name": m, "model": m} for m in installed),
        )


class FakeBoard:
    """The Redis board in memory (claims never expire: each test runs one round per claim)."""

    def __init__(self) -> None:
        self.claims: dict[str, str] = {}
        self.statuses: dict[str, BackendStatus] = {}
        self.down = False

    async def claim_check(self, name: str, token: str, interval_ms: int) -> bool:
        if self.down:
            raise BoardUnavailable("down")
        return self.claims.setdefault(name, token) == token

    async def publish(self, status: BackendStatus, ttl_ms: int) -> None:
        if self.down:
            raise BoardUnavailable("down")
        self.statuses[status.name] = status

    async def read(self, names: Sequence[str]) -> dict[str, BackendStatus]:
        if self.down:
            raise BoardUnavailable("down")
        return {n: self.statuses[n] for n in names if n in self.statuses}

    def new_round(self) -> None:
        self.claims.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _discovery(
    directory: FakeDirectory, checker: FakeChecker, board: FakeBoard, clock: Clock | None = None
) -> FleetDiscovery:
    return FleetDiscovery(
        directory,
        checker,
        board,
        interval_seconds=3.0,
        breaker_policy=BreakerPolicy(failure_threshold=3, open_seconds=5.0),
        monotonic=clock or Clock(),
    )


async def test_the_catalogue_is_the_union_of_the_usable_backends() -> None:
    checker = FakeChecker({"gpu1": ("llama3.2", "qwen2.5:0.5b"), "gpu2": ("mistral",)})
    fleet = _discovery(FakeDirectory(GPU1, GPU2), checker, FakeBoard())
    catalogue = await fleet.catalogue()  # the first call runs a round
    assert set(catalogue.entries) == {"llama3.2:latest", "qwen2.5:0.5b", "mistral:latest"}
    assert catalogue.effective(["mistral", "gone"]) == {"mistral:latest"}
    assert [h.spec.name for h in fleet.backends_with("mistral")] == ["gpu2"]
    assert fleet.health()["gpu1"].loaded == {"llama3.2:latest"}


async def test_an_unreachable_or_drained_backend_offers_nothing() -> None:
    drained = BackendSpec("gpu2", GPU2.url, 2, state=BackendState.DRAINING)
    checker = FakeChecker({"gpu1": None, "gpu2": ("mistral",), "gpu3": ("phi3",)})
    gpu3 = BackendSpec("gpu3", "http://gpu3:1", 1)
    fleet = _discovery(FakeDirectory(GPU1, drained, gpu3), checker, FakeBoard())
    assert set((await fleet.catalogue()).entries) == {"phi3:latest"}
    assert [h.spec.name for h in fleet.usable()] == ["gpu3"]
    # drained is healthy (its running requests finish), just not usable for new ones
    assert fleet.health()["gpu2"].healthy(100.0) and not fleet.health()["gpu1"].healthy(100.0)


async def test_no_usable_backend_fails_closed() -> None:
    fleet = _discovery(FakeDirectory(GPU1), FakeChecker({"gpu1": None}), FakeBoard())
    with pytest.raises(DiscoveryFailed, match="no backend is healthy"):
        await fleet.catalogue()


async def test_one_replica_checks_a_backend_per_round_the_others_read_it() -> None:
    board, checker = FakeBoard(), FakeChecker({"gpu1": ("llama3.2",), "gpu2": ("mistral",)})
    directory = FakeDirectory(GPU1, GPU2)
    replicas = [_discovery(directory, checker, board) for _ in range(3)]
    for replica in replicas:
        await replica.refresh()
    assert sorted(checker.calls) == ["gpu1", "gpu2"]  # two backends, three replicas: two checks
    for replica in replicas:
        assert set((await replica.catalogue()).entries) == {"llama3.2:latest", "mistral:latest"}
    board.new_round()
    for replica in replicas:
        await replica.refresh()
    assert len(checker.calls) == 4


async def test_redis_away_every_replica_checks_for_itself() -> None:
    board, checker = FakeBoard(), FakeChecker({"gpu1": ("llama3.2",)})
    board.down = True
    replicas = [_discovery(FakeDirectory(GPU1), checker, board) for _ in range(2)]
    for replica in replicas:
        assert set((await replica.catalogue()).entries) == {"llama3.2:latest"}
    assert checker.calls == ["gpu1", "gpu1"]


async def test_passive_failures_open_the_breaker_and_a_check_closes_it_again() -> None:
    clock, board = Clock(), FakeBoard()
    checker = FakeChecker({"gpu1": ("llama3.2",), "gpu2": ("llama3.2",)})
    fleet = _discovery(FakeDirectory(GPU1, GPU2), checker, board, clock)
    await fleet.refresh()
    for outcome in (Outcome.CONNECT_ERROR, Outcome.SERVER_ERROR, Outcome.TIMEOUT):
        fleet.record("gpu1", outcome)
    assert fleet.health()["gpu1"].breaker.state(clock.now) is CircuitState.OPEN
    assert [h.spec.name for h in fleet.backends_with("llama3.2")] == ["gpu2"]
    clock.now += 5.0  # half-open: the next successful check closes it
    board.new_round()
    await fleet.refresh()
    assert fleet.health()["gpu1"].breaker.state(clock.now) is CircuitState.CLOSED
    assert [h.spec.name for h in fleet.backends_with("llama3.2")] == ["gpu1", "gpu2"]
    fleet.record("unknown-backend", Outcome.TIMEOUT)  # ignored


async def test_failed_active_checks_open_the_breaker_too() -> None:
    board, checker = FakeBoard(), FakeChecker({"gpu1": None})
    fleet = _discovery(FakeDirectory(GPU1), checker, board)
    for _ in range(3):
        board.new_round()
        await fleet.refresh()
    assert fleet.health()["gpu1"].breaker.state(100.0) is CircuitState.OPEN


async def test_a_directory_change_is_followed() -> None:
    directory = FakeDirectory(GPU1)
    checker = FakeChecker({"gpu1": ("llama3.2",), "gpu2": ("mistral",)})
    fleet = _discovery(directory, checker, FakeBoard())
    await fleet.refresh()
    directory.change(GPU1, GPU2)
    assert set(fleet.health()) == {"gpu1", "gpu2"}
    assert fleet.health()["gpu2"].status is None  # not checked yet: not usable
    await fleet.refresh()
    assert "mistral:latest" in (await fleet.catalogue()).entries
    # drained: out of the catalogue at once, its status and breaker kept
    directory.change(GPU1, BackendSpec("gpu2", GPU2.url, 2, state=BackendState.DRAINING))
    assert "mistral:latest" not in (await fleet.catalogue()).entries
    assert fleet.health()["gpu2"].status is not None
    directory.change(GPU1)
    assert set(fleet.health()) == {"gpu1"}


async def test_half_open_admits_only_the_trial_requests_then_closes_or_reopens() -> None:
    clock, board = Clock(), FakeBoard()
    checker = FakeChecker({"gpu1": ("llama3.2",)})
    fleet = FleetDiscovery(
        FakeDirectory(GPU1),
        checker,
        board,
        interval_seconds=3.0,
        breaker_policy=BreakerPolicy(failure_threshold=1, open_seconds=5.0, trial_requests=2),
        monotonic=clock,
    )
    await fleet.refresh()
    gpu1 = fleet.health()["gpu1"]
    fleet.record("gpu1", Outcome.CONNECT_ERROR)
    assert not fleet.allow("gpu1") and not gpu1.available(clock.now)  # open
    clock.now += 5.0  # half-open: two trials, then nothing until one reports
    assert gpu1.available(clock.now)
    assert [fleet.allow("gpu1") for _ in range(3)] == [True, True, False]
    assert not gpu1.available(clock.now)  # the pool routes elsewhere meanwhile
    assert gpu1.healthy(clock.now)  # still listed (its models stay in the catalogue)
    fleet.record("gpu1", Outcome.SERVER_ERROR)  # a trial failed: open again
    assert gpu1.breaker.state(clock.now) is CircuitState.OPEN
    clock.now += 5.0
    assert fleet.allow("gpu1")
    fleet.record("gpu1", Outcome.SUCCESS)  # a trial succeeded: closed, all traffic again
    assert all(fleet.allow("gpu1") for _ in range(10))
    assert not fleet.allow("unknown-backend")
