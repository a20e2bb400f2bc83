"""Keyed fingerprints on real Postgres and Redis (issue 10, items 5 and 9).

Someone who knows only a key's public prefix must not be able to lock its
owner out, and the fingerprints must survive a rotation of the server secret.
Argon2 work is counted on the hasher; a fingerprint is read back from the row.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys, secret_kid
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from neuronetz_gateway.settings import Secret, Settings
from tests.conftest import TEST_SECRET, unique
from tests.integration.auth_helpers import (
    authorize,
    cheap_hasher,
    make_key,
    make_settings,
    running_app,
)
from tests.support.cli import run_cli, run_cli_json

pytestmark = pytest.mark.integration

OLD_SECRET = b"old-gateway-secret-" + b"o" * 40
NEW_SECRET = b"new-gateway-secret-" + b"n" * 40


@pytest.fixture
def settings(database_url: str, redis_test_url: str, redis_prefix: str) -> Settings:
    return make_settings(database_url, redis_test_url, redis_prefix)


@pytest.fixture
def rotating(database_url: str, redis_test_url: str, redis_prefix: str) -> Settings:
    """Mid-rotation: new secret in use, the old one still accepted."""
    return make_settings(
        database_url,
        redis_test_url,
        redis_prefix,
        gateway_secret=Secret(NEW_SECRET.decode()),
        gateway_secret_previous=Secret(OLD_SECRET.decode()),
    )


async def _fingerprints(store: Store, prefix: str) -> tuple[str | None, str | None]:
    row = await store.pool.fetchrow(
        "SELECT secret_fingerprint, previous_fingerprint FROM api_key WHERE prefix = $1", prefix
    )
    assert row is not None
    return row["secret_fingerprint"], row["previous_fingerprint"]


async def _flood(client: httpx.AsyncClient, prefix: str, count: int) -> None:
    """``count`` different wrong secrets with valid checksums under ``prefix``."""
    for start in range(0, count, 20):
        answers = await asyncio.gather(
            *(authorize(client, generate_key(prefix).full) for _ in range(min(20, count - start)))
        )
        assert {a.status_code for a in answers} == {401}


async def test_a_prefix_flood_costs_no_argon2_and_the_owners_uncached_key_gets_in(
    settings: Settings, store: Store
) -> None:
    owner = await make_key(store, fingerprint_secret=TEST_SECRET.encode())
    hasher = cheap_hasher()
    async with running_app(settings, store, hasher) as (client, _):
        await _flood(client, owner.record.prefix, 100)
        assert hasher.verifications == 0
        # never used, so in no cache: decided by its fingerprint, first try
        assert (await authorize(client, owner.full)).status_code == 200
        # rotated during the flood (what an owner under attack would do): the new
        # secret, fingerprinted by the CLI, works at once, the old one never again
        new = generate_key(owner.record.prefix)
        await store.rotate_key(
            owner.record.prefix,
            hasher.hash(new.full),
            0,
            FingerprintKeys(TEST_SECRET.encode()).make(new.full),
        )
        await asyncio.sleep(0.2)  # the NOTIFY evicts the cached old secret
        await _flood(client, owner.record.prefix, 40)
        assert (await authorize(client, new.full)).status_code == 200
        assert (await authorize(client, owner.full)).status_code == 401
        assert hasher.verifications == 0
        metrics = (await client.get("/metrics")).text
        assert 'nz_auth_key_fingerprints_total{verdict="mismatch"}' in metrics
        assert "nz_auth_argon2_throttled_total 0.0" in metrics


async def test_a_key_without_a_fingerprint_gets_one_on_first_use(
    settings: Settings, store: Store
) -> None:
    owner = await make_key(store)  # hash only: made without the server secret
    assert await _fingerprints(store, owner.record.prefix) == (None, None)
    hasher = cheap_hasher()
    async with running_app(settings, store, hasher) as (client, _):
        assert (await authorize(client, owner.full)).status_code == 200
        assert hasher.verifications == 1  # Argon2, the verifier of record, once
    stored, _ = await _fingerprints(store, owner.record.prefix)
    assert stored is not None and stored.startswith(secret_kid(TEST_SECRET.encode()) + ".")
    assert owner.full[11:] not in stored
    # a new replica (caches flushed): the flood and the owner cost no Argon2 now
    other = cheap_hasher()
    async with running_app(settings, store, other) as (client, _):
        await _flood(client, owner.record.prefix, 60)
        assert (await authorize(client, owner.full)).status_code == 200
        assert other.verifications == 0


async def test_the_previous_server_secret_is_accepted_and_the_fingerprint_rekeyed(
    rotating: Settings, settings: Settings, store: Store
) -> None:
    owner = await make_key(store, fingerprint_secret=OLD_SECRET)
    hasher = cheap_hasher()
    async with running_app(rotating, store, hasher) as (client, _):
        await _flood(client, owner.record.prefix, 40)  # decided under the old secret
        assert (await authorize(client, owner.full)).status_code == 200
        assert hasher.verifications == 0
    stored, _ = await _fingerprints(store, owner.record.prefix)
    assert stored == FingerprintKeys(NEW_SECRET).make(owner.full)
    # A fingerprint under a secret this replica does not hold is no refusal:
    # Argon2 decides (and re-keys it), as for a key without one.
    stale = await make_key(store, fingerprint_secret=OLD_SECRET)
    other = cheap_hasher()
    async with running_app(settings, store, other) as (client, _):
        assert (await authorize(client, stale.full)).status_code == 200
        assert other.verifications == 1
    stored, _ = await _fingerprints(store, stale.record.prefix)
    assert stored == FingerprintKeys(TEST_SECRET.encode()).make(stale.full)


async def test_a_hash_changed_without_its_fingerprint_drops_the_fingerprint(
    settings: Settings, store: Store
) -> None:
    first = await make_key(store, fingerprint_secret=TEST_SECRET.encode())
    second = generate_key(first.record.prefix)
    hasher = cheap_hasher()
    # by hand, as an operator or an older CLI might: the hash alone
    await store.pool.execute(
        "UPDATE api_key SET secret_hash = $2 WHERE prefix = $1",
        first.record.prefix,
        hasher.hash(second.full),
    )
    assert await _fingerprints(store, first.record.prefix) == (None, None)
    async with running_app(settings, store, hasher) as (client, _):
        assert (await authorize(client, first.full)).status_code == 401
        assert (await authorize(client, second.full)).status_code == 200


async def test_rotation_moves_the_fingerprint_with_its_hash(
    settings: Settings, store: Store
) -> None:
    owner = await make_key(store, fingerprint_secret=TEST_SECRET.encode())
    before, _ = await _fingerprints(store, owner.record.prefix)
    hasher = cheap_hasher()
    new = generate_key(owner.record.prefix)
    await store.rotate_key(owner.record.prefix, hasher.hash(new.full), 60)  # no new fingerprint
    assert await _fingerprints(store, owner.record.prefix) == (None, before)
    async with running_app(settings, store, hasher) as (client, _):
        # the old secret, in its grace, is decided by its fingerprint
        assert (await authorize(client, owner.full)).status_code == 200
        assert hasher.verifications == 0
        assert (await authorize(client, new.full)).status_code == 200
        assert hasher.verifications == 1  # the new secret had none yet: Argon2 once
    newer = generate_key(owner.record.prefix)
    await store.rotate_key(owner.record.prefix, hasher.hash(newer.full), 0)
    assert await _fingerprints(store, owner.record.prefix) == (None, None)


async def test_storing_a_fingerprint_evicts_no_cache(database_url: str, store: Store) -> None:
    quiet = await make_key(store)
    loud = await make_key(store)
    events: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        # key events only: a listener of a service still running elsewhere in the
        # suite may send its liveness pings on the same channel
        await conn.add_listener(
            "nz_key_events",
            lambda *args: args[3].startswith("key:") and events.put_nowait(args[3]),
        )
        assert await store.set_key_fingerprint(
            quiet.record.id,
            previous=False,
            verified_hash=(await _hash(store, quiet.record.prefix)),
            fingerprint=FingerprintKeys(TEST_SECRET.encode()).make(quiet.full),
        )
        await store.update_key_policy(loud.record.prefix, {"rpm": 5})
        # notifications arrive in commit order: the first is the limit change
        assert await asyncio.wait_for(events.get(), 5) == f"key:{loud.record.prefix}"
    finally:
        await conn.close()


async def _hash(store: Store, prefix: str) -> str:
    value = await store.pool.fetchval("SELECT secret_hash FROM api_key WHERE prefix = $1", prefix)
    assert isinstance(value, str)
    return value


async def test_set_fingerprint_refuses_a_hash_that_is_no_longer_the_keys(store: Store) -> None:
    owner = await make_key(store, tenant=PolicySettings())
    assert not await store.set_key_fingerprint(
        owner.record.id,
        previous=False,
        verified_hash="$argon2id$not-this-keys-hash",
        fingerprint=FingerprintKeys(TEST_SECRET.encode()).make(owner.full),
    )
    assert await _fingerprints(store, owner.record.prefix) == (None, None)


async def test_the_cli_fingerprints_keys_when_it_has_the_secret(
    database_url: str, store: Store
) -> None:
    tenant = unique("cli")
    await store.create_tenant(tenant, PolicySettings())
    with_secret = {"NZ_GATEWAY_SECRET": TEST_SECRET}
    made = await asyncio.to_thread(
        run_cli_json,
        database_url,
        "create-key",
        "--tenant",
        tenant,
        "--name",
        "k1",
        env_changes=with_secret,
    )
    fingerprints = FingerprintKeys(TEST_SECRET.encode())
    assert await _fingerprints(store, made["prefix"]) == (fingerprints.make(made["key"]), None)
    rotated = await asyncio.to_thread(
        run_cli_json,
        database_url,
        "rotate-key",
        "--prefix",
        made["prefix"],
        "--grace-seconds",
        "60",
        env_changes=with_secret,
    )
    assert await _fingerprints(store, made["prefix"]) == (
        fingerprints.make(rotated["key"]),
        fingerprints.make(made["key"]),
    )
    # without the secret: hash only, and the operator is told what that means
    bare = await asyncio.to_thread(
        run_cli,
        database_url,
        "create-key",
        "--tenant",
        tenant,
        "--name",
        "k2",
        "--json",
        env_changes={"NZ_GATEWAY_SECRET": None},
    )
    assert "adds it on first use" in bare.stderr
    prefix = json.loads(bare.stdout)["prefix"]
    assert await _fingerprints(store, prefix) == (None, None)
