"""The pool's view of the operator's fleet, from per-backend discovery (proxy/pool.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from neuronetz_gateway.proxy.pool import (
    CONNECT_ERROR,
    DiscoveredFleet,
    FleetUpstream,
    PoolMember,
    StaticFleet,
)


@dataclass
class Spec:
    name: str
    url: str
    slots: int
    weight: int = 1
    accepts_new: bool = True


@dataclass
class Health:
    spec: Spec
    installed: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()
    up: bool = True

    def healthy(self, now: float) -> bool:
        return self.up

    def available(self, now: float) -> bool:
        return self.up


@dataclass
class Source:
    backends: dict[str, Health]
    recorded: list[tuple[str, Any]] = field(default_factory=list)

    def health(self) -> Mapping[str, Health]:
        return self.backends

    def record(self, backend: str, outcome: Any) -> None:
        self.recorded.append((backend, outcome))

    def allow(self, backend: str) -> bool:
        return self.backends[backend].up


def test_members_come_from_discovery_with_canonical_model_names() -> None:
    source = Source(
        {
            "a": Health(
                Spec("a", "http://a:1", 4, 2), frozenset({"llama3.2"}), frozenset({"llama3.2"})
            ),
            "b": Health(Spec("b", "http://b:1", 2, accepts_new=False), up=False),
        }
    )
    fleet = DiscoveredFleet(source, outcome=str.upper)
    a, b = fleet.members()
    assert a == PoolMember(
        "a",
        "http://a:1",
        4,
        2,
        True,
        True,
        frozenset({"llama3.2:latest"}),
        frozenset({"llama3.2:latest"}),
    )
    assert (b.active, b.healthy) == (False, False)
    fleet.report("a", CONNECT_ERROR)
    assert source.recorded == [("a", "CONNECT_ERROR")]


def test_the_static_fleets_breaker_opens_after_failures_in_a_row_and_closes_after_a_pause() -> None:
    now = [0.0]
    fleet = StaticFleet(
        [PoolMember("a", "http://a:1", 1)], failures_to_open=2, open_seconds=5, clock=lambda: now[0]
    )
    fleet.report("a", CONNECT_ERROR)
    fleet.report("a", "success")
    fleet.report("a", CONNECT_ERROR)
    assert fleet.members()[0].healthy  # not two in a row
    fleet.report("a", CONNECT_ERROR)
    assert not fleet.members()[0].healthy
    now[0] = 5.0
    assert fleet.members()[0].healthy  # one more try
    fleet.report("a", "server_error")
    assert not fleet.members()[0].healthy  # failed again: open at once


class Named:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    async def open(self, call: Any, path: str, body: bytes | None) -> Any:
        self.calls.append(path)
        return self.name

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        return self.name == "pool"


async def test_fleet_upstream_follows_the_directory_on_every_call() -> None:
    single, pool = Named("single"), Named("pool")
    defined = [False]
    upstream = FleetUpstream(single, pool, lambda: defined[0])
    assert await upstream.open(None, "/api/chat", b"{}") == "single"
    assert not await upstream.ping()
    defined[0] = True  # `backend add`: the next call goes through the pool
    assert await upstream.open(None, "/api/chat", b"{}") == "pool"
    assert await upstream.ping()
    assert (single.calls, pool.calls) == (["/api/chat"], ["/api/chat"])


def test_a_member_is_healthy_while_its_breaker_lets_a_call_through_and_take_asks_it() -> None:
    source = Source({"a": Health(Spec("a", "http://a:1", 4), up=False)})
    fleet = DiscoveredFleet(source, outcome=str.upper)
    (a,) = fleet.members()
    assert not a.healthy
    assert not fleet.take("a")
    source.backends["a"].up = True
    assert fleet.members()[0].healthy
    assert fleet.take("a")
    assert StaticFleet([a]).take("a")
