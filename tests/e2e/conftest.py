"""One stack for every end-to-end test: simulator, two auth, two proxy, Caddy in front.

Tests drive it only through Caddy's port (``e2e_stack.url``); they look
behind it only to check effects: what reached the simulator, and the audit
ledger in Postgres.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import Store, UsageTotals, open_pool
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from tests.conftest import TEST_SECRET, unique
from tests.e2e.processes import E2EStack, require_caddy, start_stack
from tests.support.caddy import caddy_binaries


@pytest.fixture(scope="session", params=sorted(caddy_binaries()) or ["none"])
def caddy_version(request: pytest.FixtureRequest) -> str:
    """Each distinct Caddy on this machine: the whole e2e suite runs once per version."""
    version: str = request.param
    return version


@pytest.fixture(scope="session")
def e2e_stack(
    database_url: str, redis_test_url: str, redis_prefix: str, caddy_version: str
) -> Iterator[E2EStack]:
    caddy = require_caddy(caddy_version)
    state = Path(tempfile.mkdtemp(prefix="nz-e2e-"))
    env = {
        "PATH": os.environ["PATH"],
        "NZ_DATABASE_URL": database_url,
        "NZ_REDIS_URL": redis_test_url,
        "NZ_REDIS_PREFIX": f"{redis_prefix}e2e",
        "NZ_GATEWAY_SECRET": TEST_SECRET,
        "NZ_AUDIT_SPOOL_DIR": str(state / "spool"),
        "NZ_AUDIT_FLUSH_INTERVAL_SECONDS": "0.1",
        "NZ_LOG_FORMAT": "json",
    }
    stack = start_stack(env=env, log_dir=state, caddy=caddy)
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class IssuedKey:
    """A key made for a test: the full secret, its prefix and its tenant."""

    key: str
    prefix: str
    tenant: str


class Ledger:
    """Tenants, keys and the audit ledger, straight from Postgres (the tests' back door)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._hasher = KeyHasher()

    async def issue(
        self,
        tenant_name: str | None = None,
        *,
        key_policy: PolicySettings | None = None,
        **limits: Any,
    ) -> IssuedKey:
        """A new tenant (unless given) and a key for it; ``limits`` go on the tenant."""
        if tenant_name is None:
            tenant_name = unique("e2e")
            await self.store.create_tenant(tenant_name, PolicySettings().updated(limits))
        key = generate_key()
        secret_hash = await asyncio.to_thread(self._hasher.hash, key.full)
        await self.store.create_key(
            tenant_name=tenant_name,
            name=unique("key"),
            prefix=key.prefix,
            secret_hash=secret_hash,
            policy=key_policy or PolicySettings(),
            expires_at=None,
            log_prompts=False,
            prompt_ttl_days=None,
        )
        return IssuedKey(key.full, key.prefix, tenant_name)

    async def usage(self, tenant: str) -> UsageTotals:
        """The tenant's ledger totals."""
        return await self.store.usage(tenant)

    async def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's newest audit rows."""
        return await self.store.audit(tenant, limit)

    async def wait_for_requests(self, tenant: str, count: int, within: float = 5.0) -> UsageTotals:
        """Poll until the tenant's ledger has ``count`` requests (the writer batches)."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            totals = await self.usage(tenant)
            if totals.requests >= count or asyncio.get_running_loop().time() > deadline:
                return totals
            await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await open_pool(database_url, min_size=1, max_size=4)
    try:
        yield Ledger(Store(pool))
    finally:
        await pool.close()


@pytest.fixture
def nonce() -> str:
    """A short random string for prompts that must not collide between tests."""
    return secrets.token_hex(4)
