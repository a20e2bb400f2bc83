"""Key secrets through real Caddy (issue 10, items 5 and 9).

A prefix flood (different wrong secrets with valid checksums, at 10/s) must
leave the owner's key answering 200 on its first try, whether it was never
used, just rotated, or evicted from every cache by ``set-limits``. And
``NZ_GATEWAY_SECRET`` must rotate under traffic, replica by replica in the
runbook's order (docs/OPERATIONS.md), without a single 401 for a valid key.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from tests.conftest import TEST_SECRET, unique
from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, require_caddy, start_stack
from tests.support.caddy import caddy_binaries
from tests.support.cli import run_cli_json

pytestmark = pytest.mark.e2e

FLOOD_RATE = 10.0  # requests per second, the issue's attacker


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def _prefix_flood(client: httpx.AsyncClient, prefix: str) -> AsyncIterator[Counter[int]]:
    """New wrong secrets under ``prefix`` at :data:`FLOOD_RATE` until the block ends."""
    statuses: Counter[int] = Counter()
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        answer = await client.get("/api/tags", headers=_bearer(generate_key(prefix).full))
        statuses[answer.status_code] += 1

    async def flood() -> None:
        while True:
            task = asyncio.ensure_future(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / FLOOD_RATE)

    sender = asyncio.ensure_future(flood())
    try:
        await asyncio.sleep(2.0)  # 20 wrong secrets: 3 used to exhaust the prefix
        yield statuses
    finally:
        sender.cancel()
        await asyncio.gather(sender, *pending, return_exceptions=True)


async def test_a_prefix_flood_leaves_the_owners_key_answering_on_its_first_try(
    e2e_stack: E2EStack, ledger: Ledger, database_url: str
) -> None:
    tenant = unique("flood")
    await ledger.store.create_tenant(tenant, PolicySettings())
    with_secret = {"NZ_GATEWAY_SECRET": TEST_SECRET}  # as compose's migrate service has it
    made = await asyncio.to_thread(
        run_cli_json,
        database_url,
        "create-key",
        "--tenant",
        tenant,
        "--name",
        "owner",
        env_changes=with_secret,
    )
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        async with _prefix_flood(client, made["prefix"]) as flood:
            # new: in no cache, never verified
            assert (await client.get("/api/tags", headers=_bearer(made["key"]))).status_code == 200
            rotated = await asyncio.to_thread(
                run_cli_json,
                database_url,
                "rotate-key",
                "--prefix",
                made["prefix"],
                env_changes=with_secret,
            )
            new = await client.get("/api/tags", headers=_bearer(rotated["key"]))
            assert new.status_code == 200
        assert set(flood) == {401}
        assert flood[401] >= 20

        # a key made without the secret (hash only) gets its fingerprint on first
        # use; evicted from every cache afterwards, it still gets in under a flood
        used = await ledger.issue(tenant)
        assert (await client.get("/api/tags", headers=_bearer(used.key))).status_code == 200
        async with _prefix_flood(client, used.prefix) as flood:
            await ledger.store.update_key_policy(used.prefix, {"rpm": 1000})  # set-limits
            await asyncio.sleep(0.5)  # the NOTIFY reaches both auth replicas
            again = await client.get("/api/tags", headers=_bearer(used.key))
            assert again.status_code == 200
        assert set(flood) == {401}


OLD_SECRET = TEST_SECRET + "-old"
NEW_SECRET = TEST_SECRET + "-new"
#: NZ_IDENTITY_TTL_SECONDS of the rotation stack: the runbook waits it out before
#: dropping the old secret, so a short one (test-only) keeps the test short
ROTATION_IDENTITY_TTL = 2


@pytest.fixture
def rotation_stack(database_url: str, redis_test_url: str, redis_prefix: str) -> Iterator[E2EStack]:
    """A stack of its own (it gets restarted), on the newest Caddy, signing with OLD_SECRET."""
    versions = sorted(caddy_binaries(), key=lambda v: tuple(int(p) for p in v.split(".")))
    caddy = require_caddy(versions[-1] if versions else "none")
    state = Path(tempfile.mkdtemp(prefix="nz-e2e-rot-"))
    env = {
        "PATH": os.environ["PATH"],
        "NZ_DATABASE_URL": database_url,
        "NZ_REDIS_URL": redis_test_url,
        "NZ_REDIS_PREFIX": f"{redis_prefix}rot",
        "NZ_GATEWAY_SECRET": OLD_SECRET,
        "NZ_IDENTITY_TTL_SECONDS": str(ROTATION_IDENTITY_TTL),
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


async def test_rotating_the_gateway_secret_under_traffic_refuses_no_valid_key(
    rotation_stack: E2EStack, ledger: Ledger, database_url: str
) -> None:
    stack = rotation_stack
    tenant = unique("rot")
    await ledger.store.create_tenant(tenant, PolicySettings())
    keys = [(await ledger.issue(tenant)).key for _ in range(2)]  # hash only
    for name in ("a", "b"):  # fingerprinted under the old secret, as its CLI did
        made = await asyncio.to_thread(
            run_cli_json,
            database_url,
            "create-key",
            "--tenant",
            tenant,
            "--name",
            name,
            env_changes={"NZ_GATEWAY_SECRET": OLD_SECRET},
        )
        keys.append(made["key"])
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
            turn = worker
            while not stop.is_set():
                key = keys[turn % len(keys)]
                turn += 1
                statuses[(await client.get("/api/tags", headers=_bearer(key))).status_code] += 1

    workers = [asyncio.ensure_future(traffic(i)) for i in range(4)]
    rotating = {"NZ_GATEWAY_SECRET": NEW_SECRET, "NZ_GATEWAY_SECRET_PREVIOUS": OLD_SECRET}
    try:
        await asyncio.sleep(1.0)
        # the runbook: verifiers (proxies) first, then signers (auth), then, once
        # every identity signed with the old secret has expired, drop it
        for name in ("proxy1", "proxy2", "auth1", "auth2"):
            await asyncio.to_thread(stack.restart, name, rotating)
            await asyncio.sleep(0.5)
        await asyncio.sleep(ROTATION_IDENTITY_TTL + 1.0)  # every old identity expired
        for name in ("proxy1", "proxy2"):
            await asyncio.to_thread(stack.restart, name, {"NZ_GATEWAY_SECRET_PREVIOUS": None})
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    assert statuses[401] == 0, (dict(statuses), stack.logs())
    assert statuses[200] >= 100, dict(statuses)
    assert set(statuses) == {200}, dict(statuses)
    # and the keys work on, under the new secret alone at the proxies
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        for key in keys:
            assert (await client.get("/api/tags", headers=_bearer(key))).status_code == 200
