"""The key verifier on fakes of its ports (key rows, shared cache): no Redis, no Postgres.

Argon2 is real, with the cheapest parameters: the point here is which path a
key takes (cache, fingerprint, Argon2, refusal) and what each path touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import AuthKeyRecord, KeyRecord, TenantRecord
from neuronetz_gateway.auth.key_cache import LocalKeyCache, VerifiedKey
from neuronetz_gateway.auth.key_verifier import KeyStoreUnavailable, KeyVerifier
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings

SECRET = b"verifier-unit-" + b"k" * 32
NOW = 1_900_000_000.0
HASHER = KeyHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass
class FakeKeyRows:
    records: dict[str, AuthKeyRecord] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    fingerprints: list[tuple[int, str]] = field(default_factory=list)
    down: bool = False

    async def find_key_for_auth(self, prefix: str) -> AuthKeyRecord | None:
        self.lookups.append(prefix)
        if self.down:
            raise asyncpg.CannotConnectNowError("starting up")
        return self.records.get(prefix)

    async def set_key_fingerprint(
        self, key_id: int, *, previous: bool, verified_hash: str, fingerprint: str
    ) -> bool:
        self.fingerprints.append((key_id, fingerprint))
        return True

    async def update_key_hash(
        self, key_id: int, old_hash: str, new_hash: str, fingerprint: str | None = None
    ) -> None:
        return None


@dataclass
class FakeSharedCache:
    entries: dict[str, VerifiedKey] = field(default_factory=dict)

    async def get(self, fp: str) -> tuple[VerifiedKey | None, int]:
        return self.entries.get(fp), int(NOW * 1000)

    async def put(self, fp: str, key: VerifiedKey, since_ms: int) -> bool:
        self.entries[fp] = key
        return True

    async def evict_prefix(self, prefix: str) -> int:
        gone = [fp for fp, key in self.entries.items() if key.prefix == prefix]
        for fp in gone:
            del self.entries[fp]
        return len(gone)

    async def evict_tenant(self, tenant_id: int) -> int:
        return 0

    async def flush(self) -> None:
        self.entries.clear()


def _record(full_key: str, *, fingerprinted: bool, revoked: bool = False) -> AuthKeyRecord:
    created = datetime.fromtimestamp(NOW, UTC) - timedelta(days=1)
    key = KeyRecord(
        id=11,
        tenant_id=7,
        tenant_name="acme",
        name="ci",
        prefix=full_key[:11],
        policy=PolicySettings(rpm=60),
        expires_at=None,
        revoked_at=created if revoked else None,
        previous_valid_until=None,
        log_prompts=False,
        prompt_ttl_days=None,
        created_at=created,
    )
    tenant = TenantRecord(id=7, name="acme", policy=PolicySettings(), created_at=created)
    stored_fp = FingerprintKeys(SECRET).make(full_key) if fingerprinted else None
    return AuthKeyRecord(key, tenant, HASHER.hash(full_key), None, stored_fp)


def _verifier(rows: FakeKeyRows, cache: FakeSharedCache) -> KeyVerifier:
    verifier = KeyVerifier(
        store=rows,
        hasher=HASHER,
        local=LocalKeyCache(ttl_seconds=60, negative_ttl_seconds=60),
        remote=cache,
        secret=SECRET,
        metrics=AuthMetrics(),
        clock=lambda: NOW,
    )
    verifier.use_local = True
    return verifier


async def test_a_fingerprinted_key_is_accepted_without_argon2_then_served_from_cache() -> None:
    key = generate_key().full
    rows, cache = FakeKeyRows({key[:11]: _record(key, fingerprinted=True)}), FakeSharedCache()
    verifier = _verifier(rows, cache)
    before = HASHER.verifications

    first = await verifier.check(key)
    again = await verifier.check(key)

    assert first.key is not None and first.reason == "ok"
    assert (first.key.tenant_id, first.key.key_id, first.key.key_limits.rpm) == (7, 11, 60)
    assert again.key == first.key
    assert rows.lookups == [key[:11]]  # once; then the local cache
    assert len(cache.entries) == 1  # shared with the other replicas
    assert HASHER.verifications == before


async def test_a_key_without_fingerprint_is_verified_by_argon2_once_and_fingerprinted() -> None:
    key = generate_key().full
    rows = FakeKeyRows({key[:11]: _record(key, fingerprinted=False)})
    verifier = _verifier(rows, FakeSharedCache())
    before = HASHER.verifications

    check = await verifier.check(key)

    assert check.reason == "ok"
    assert HASHER.verifications == before + 1
    assert [key_id for key_id, _ in rows.fingerprints] == [11]


async def test_a_wrong_secret_on_a_known_prefix_is_refused_by_fingerprint_without_argon2() -> None:
    key = generate_key().full
    wrong = generate_key(key[:11]).full  # same prefix, valid checksum, other secret
    rows = FakeKeyRows({key[:11]: _record(key, fingerprinted=True)})
    verifier = _verifier(rows, FakeSharedCache())
    before = HASHER.verifications

    refused = await verifier.check(wrong)
    refused_again = await verifier.check(wrong)

    assert (refused.key, refused.reason) == (None, "wrong_secret")
    assert refused_again.reason == "wrong_secret"
    assert rows.lookups == [key[:11]]  # the second answer came from the negative cache
    assert HASHER.verifications == before


@pytest.mark.parametrize(
    ("presented", "reason"),
    [(None, "missing"), ("nz_short", "malformed"), ("x" * 43, "malformed")],
)
async def test_garbage_stops_before_any_lookup(presented: str | None, reason: str) -> None:
    rows = FakeKeyRows()
    check = await _verifier(rows, FakeSharedCache()).check(presented)
    assert (check.key, check.reason) == (None, reason)
    assert rows.lookups == []


async def test_unknown_and_revoked_keys_are_refused() -> None:
    revoked = generate_key().full
    rows = FakeKeyRows({revoked[:11]: _record(revoked, fingerprinted=True, revoked=True)})
    verifier = _verifier(rows, FakeSharedCache())

    assert (await verifier.check(generate_key().full)).reason == "unknown"
    assert (await verifier.check(revoked)).reason == "revoked"


async def test_postgres_away_fails_closed() -> None:
    rows = FakeKeyRows(down=True)
    with pytest.raises(KeyStoreUnavailable):
        await _verifier(rows, FakeSharedCache()).check(generate_key().full)
