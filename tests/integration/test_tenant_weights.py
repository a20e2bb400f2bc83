"""Tenant weights for the backend queues, from the real Postgres (adapters/tenant_weights.py)."""

from __future__ import annotations

import pytest

from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.adapters.tenant_weights import TenantWeights
from neuronetz_gateway.domain.policy import PolicySettings
from tests.conftest import unique

pytestmark = pytest.mark.integration


async def test_weights_load_change_and_survive_an_outage(database_url: str, store: Store) -> None:
    heavy = await store.create_tenant(unique("w"), PolicySettings(), weight=3)
    plain = await store.create_tenant(unique("w"), PolicySettings())
    pool = await open_pool(database_url, min_size=0, max_size=2)
    weights = TenantWeights(pool, refresh_seconds=60)
    assert weights(heavy.id) == 1  # nothing loaded yet: everyone weighs 1
    await weights.load()
    assert (weights(heavy.id), weights(plain.id)) == (3, 1)
    await store.set_tenant_weight(plain.name, 5)
    await store.set_tenant_weight(heavy.name, None)
    await weights.load()
    assert (weights(heavy.id), weights(plain.id)) == (1, 5)
    await pool.close()  # Postgres "away": the last weights stay
    await weights.load()
    assert weights(plain.id) == 5
