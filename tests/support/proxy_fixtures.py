"""Fixtures for proxy integration tests: import them into a test module.

``simulator`` and ``proxy`` are one real simulator and one real proxy
(Granian subprocess) per test module; the simulator is reset before each
test that asks for ``sim``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.proxy_stack import (
    DISCOVERY_TTL,
    ProxyServer,
    SimulatorServer,
    running_proxy,
    running_simulator,
)

__all__ = ["DISCOVERY_TTL", "proxy", "sim", "simulator"]


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with running_simulator() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(
    simulator: SimulatorServer, database_url: str, redis_test_url: str, redis_prefix: str
) -> Iterator[ProxyServer]:
    with running_proxy(
        database_url=database_url,
        redis_url=redis_test_url,
        redis_prefix=redis_prefix,
        ollama_url=simulator.url,
    ) as server:
        yield server


@pytest.fixture
def sim(simulator: SimulatorServer) -> SimulatorServer:
    """The module's simulator, reset to its defaults with nothing recorded."""
    simulator.reset()
    if simulator.models_changed:
        time.sleep(DISCOVERY_TTL + 0.1)  # let the proxies forget the old model list
        simulator.models_changed = False
    return simulator
