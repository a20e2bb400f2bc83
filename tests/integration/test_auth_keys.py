"""Key checks of /authorize against real Postgres and Redis: one 401 for every refusal,
bounded Argon2 work, rotation grace, rehash, and the signed identity."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import AuthKeyRecord, Store
from neuronetz_gateway.auth.authorize import new_request_id
from neuronetz_gateway.domain.identity import (
    IDENTITY_HEADER,
    Identity,
    IdentityError,
    Limits,
    sign_identity,
    verify_identity,
)
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from neuronetz_gateway.settings import Settings
from tests.conftest import TEST_SECRET
from tests.integration.auth_helpers import (
    authorize,
    cheap_hasher,
    make_key,
    make_settings,
    running_app,
)
from tests.support.redis_deployments import RedisDeployment

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(database_url: str, redis_deployment: RedisDeployment, redis_prefix: str) -> Settings:
    """Auth (its key cache shared in Redis) on each Redis deployment in turn."""
    return make_settings(
        database_url,
        redis_deployment.url,
        redis_prefix,
        redis_ca_file=redis_deployment.ca_file or "",
    )


def _flip_checksum(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


async def test_every_refused_key_gets_the_byte_identical_401(
    settings: Settings, store: Store
) -> None:
    good = await make_key(store)
    expired = await make_key(store, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    revoked = await make_key(store)
    await store.revoke_key(revoked.record.prefix)
    wrong_secret = generate_key(good.record.prefix).full
    unknown = generate_key().full
    refused = {
        "malformed": "not-a-key",
        "bad-checksum": _flip_checksum(good.full),
        "unknown": unknown,
        "wrong-secret": wrong_secret,
        "expired": expired.full,
        "revoked": revoked.full,
        "empty": "",
    }
    async with running_app(settings, store) as (client, _):
        ok = await authorize(client, good.full)
        assert ok.status_code == 200
        for uri in ("/api/chat", "/v1/chat/completions"):
            answers = [await authorize(client, None, uri=uri)]
            answers.append(
                await authorize(client, "x", uri=uri, extra={"authorization": "Basic eA=="})
            )
            for key in refused.values():
                answers.append(await authorize(client, key, uri=uri))
                answers.append(await authorize(client, key, uri=uri, header="x-api-key"))
            first = answers[0]
            assert first.status_code == 401
            assert first.headers["www-authenticate"] == "Bearer"
            # every answer names its request (issue 14); nothing else may differ
            ids = [a.headers["x-request-id"] for a in answers]
            assert len(set(ids)) == len(ids)

            def without_id(answer: httpx.Response) -> list[tuple[str, str]]:
                return [(k, v) for k, v in answer.headers.multi_items() if k != "x-request-id"]

            for answer in answers[1:]:
                assert answer.status_code == first.status_code
                assert answer.content == first.content
                assert without_id(answer) == without_id(first)
        assert (await authorize(client, good.full, header="x-api-key")).status_code == 200


async def test_a_flood_of_wrong_secrets_under_a_valid_prefix_costs_a_handful_of_argon2(
    settings: Settings, store: Store
) -> None:
    victim = await make_key(store)
    hasher = cheap_hasher()
    async with running_app(settings, store, hasher) as (client, _):
        wrong = [generate_key(victim.record.prefix).full for _ in range(200)]
        answers = await asyncio.gather(*(authorize(client, k) for k in wrong))
        assert {a.status_code for a in answers} == {401}
        assert hasher.verifications <= 4
        # the same wrong key again and again: the negative cache, no Argon2 at all
        before = hasher.verifications
        for _ in range(50):
            assert (await authorize(client, wrong[0])).status_code == 401
        assert hasher.verifications == before


class _CountingStore(Store):
    """The real store, counting key lookups (Postgres is still asked for real)."""

    lookups = 0

    async def find_key_for_auth(self, prefix: str) -> AuthKeyRecord | None:
        self.lookups += 1
        return await super().find_key_for_auth(prefix)


async def test_a_burst_of_secrets_on_one_prefix_costs_one_lookup_known_or_not(
    settings: Settings, store: Store
) -> None:
    # There is no per-prefix refusal before the lookup (a throttled known prefix
    # answering faster than an unknown one would tell which prefixes exist);
    # concurrent misses on one prefix share one Postgres lookup instead.
    victim = await make_key(store)
    counting = _CountingStore(store.pool)
    async with running_app(settings, counting, cheap_hasher()) as (client, _):
        for prefix in (victim.record.prefix, generate_key().prefix):
            before = counting.lookups
            answers = await asyncio.gather(
                *(authorize(client, generate_key(prefix).full) for _ in range(40))
            )
            assert {a.status_code for a in answers} == {401}
            assert counting.lookups - before <= 10


async def test_a_cached_key_costs_no_argon2(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    hasher = cheap_hasher()
    async with running_app(settings, store, hasher) as (client, _):
        burst = await asyncio.gather(*(authorize(client, made.full) for _ in range(20)))
        assert {a.status_code for a in burst} == {200}
        assert hasher.verifications == 1  # single flight: one verification for the burst
        for _ in range(20):
            assert (await authorize(client, made.full)).status_code == 200
        assert hasher.verifications == 1
        metrics = (await client.get("/metrics")).text
        assert 'nz_auth_key_cache_total{result="local_hit"}' in metrics
        assert 'nz_auth_argon2_verifications_total{result="match"} 1.0' in metrics
    # a second replica finds it in the shared Redis cache: still no Argon2
    other = cheap_hasher()
    async with running_app(settings, store, other) as (client, _):
        # the new replica flushed the caches on start (it cannot know what it missed);
        # the fingerprint stored on first use decides the key: still no Argon2
        assert (await authorize(client, made.full)).status_code == 200
        assert other.verifications == 0
    async with running_app(settings, store, cheap_hasher(), listen=False) as (client, _):
        assert (await authorize(client, made.full)).status_code == 200
        assert 'nz_auth_key_cache_total{result="redis_hit"}' in (await client.get("/metrics")).text


async def test_rotation_grace_is_honoured_to_the_second(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    hasher = cheap_hasher()
    async with running_app(settings, store, hasher) as (client, _):
        assert (await authorize(client, made.full)).status_code == 200
        new = generate_key(made.record.prefix)
        rotated = await store.rotate_key(made.record.prefix, hasher.hash(new.full), grace_seconds=2)
        assert rotated.previous_valid_until is not None
        grace_end = rotated.previous_valid_until.timestamp()
        await asyncio.sleep(0.2)  # the NOTIFY evicts the cached old secret
        assert (await authorize(client, new.full)).status_code == 200
        assert (await authorize(client, made.full)).status_code == 200
        await asyncio.sleep(max(0.0, grace_end - time.time() - 0.5))
        assert (await authorize(client, made.full)).status_code == 200  # 0.5 s before the end
        await asyncio.sleep(max(0.0, grace_end - time.time()) + 0.05)
        assert (await authorize(client, made.full)).status_code == 401  # just after it
        assert (await authorize(client, new.full)).status_code == 200
        # without grace the old secret stops at once
        newer = generate_key(made.record.prefix)
        await store.rotate_key(made.record.prefix, hasher.hash(newer.full), grace_seconds=0)
        deadline = time.monotonic() + 1.0
        while (await authorize(client, new.full)).status_code == 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await authorize(client, newer.full)).status_code == 200


async def test_needs_rehash_is_honoured(settings: Settings, store: Store) -> None:
    made = await make_key(store, hasher=cheap_hasher())
    stronger = KeyHasher(2, time_cost=2, memory_cost=2048, parallelism=1)
    async with running_app(settings, store, stronger) as (client, service):
        assert (await authorize(client, made.full)).status_code == 200
        assert service.verifier is not None
        await service.verifier.aclose()  # the rehash runs in the background
        record = await store.find_key_for_auth(made.record.prefix)
        assert record is not None
        assert not stronger.needs_rehash(record.secret_hash)
        assert stronger.verify_blocking(record.secret_hash, made.full)
        await asyncio.sleep(0.2)  # its UPDATE evicted the cache; the key still works
        assert (await authorize(client, made.full)).status_code == 200


async def test_identity_header_verifies_and_any_change_breaks_it(
    settings: Settings, store: Store
) -> None:
    made = await make_key(
        store,
        tenant=PolicySettings(rpm=1000, daily_tokens=10_000, models=("llama3.2",)),
        key=PolicySettings(rpm=500, concurrency=4, max_num_ctx=2048),
    )
    async with running_app(settings, store) as (client, _):
        answer = await authorize(client, made.full, method="GET", uri="/v1/models?x=1")
    assert answer.status_code == 200
    token = answer.headers[IDENTITY_HEADER]
    now_ms = int(time.time() * 1000)
    identity = verify_identity(token, TEST_SECRET.encode(), now_ms)
    assert identity.request_id == answer.headers["x-request-id"]
    assert len(identity.request_id) == 32
    assert identity.tenant_id == made.record.tenant_id
    assert identity.tenant_name == made.record.tenant_name
    assert identity.key_id == made.record.id
    assert identity.key_prefix == made.record.prefix
    assert identity.route == "v1.models"
    assert identity.models == ["llama3.2:latest"]
    assert identity.key_limits == Limits(rpm=500, concurrency=4, daily_tokens=10_000)
    assert identity.tenant_limits == Limits(rpm=1000, daily_tokens=10_000)
    assert identity.caps.max_num_ctx == 2048
    assert identity.lease_id is not None  # a concurrency limit applies
    assert identity.allowance.limit_requests == 500
    assert identity.allowance.remaining_requests == 499
    assert 4_000 <= identity.expires_at_ms - now_ms <= 5_500  # NZ_IDENTITY_TTL_SECONDS default 5
    # expired: refused
    with pytest.raises(IdentityError):
        verify_identity(token, TEST_SECRET.encode(), identity.expires_at_ms + 1)
    # any character changed, anywhere, breaks it (a change that alters the decoded bytes:
    # the spare low bits of a base64 tail character carry nothing)
    for i, char in enumerate(token):
        for replacement in {"A", "z", ".", "_"} - {char}:
            forged = token[:i] + replacement + token[i + 1 :]
            try:
                verify_identity(forged, TEST_SECRET.encode(), now_ms)
            except IdentityError:
                continue
            assert _same_bytes(token, forged), f"forgery at {i} accepted"
    # a changed field signed with another secret, or re-signed payload with the old mac
    changed = msgspec.structs.replace(identity, tenant_id=identity.tenant_id + 1)
    with pytest.raises(IdentityError):
        verify_identity(sign_identity(changed, b"x" * 40), TEST_SECRET.encode(), now_ms)
    payload_forged = sign_identity(changed, TEST_SECRET.encode()).rsplit(".", 1)[0]
    with pytest.raises(IdentityError):
        verify_identity(
            payload_forged + "." + token.rsplit(".", 1)[1], TEST_SECRET.encode(), now_ms
        )
    assert isinstance(identity, Identity)


def _same_bytes(a: str, b: str) -> bool:
    """Whether two tokens decode to the same bytes part by part."""
    import base64

    def parts(t: str) -> list[bytes]:
        return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in t.split(".")]

    try:
        return parts(a) == parts(b)
    except ValueError:
        return False


async def test_one_log_line_per_decision_and_never_the_key(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store)
    async with running_app(settings, store) as (client, _):
        with capture_logs() as logs:
            assert (
                await authorize(client, made.full, extra={"x-request-id": "abc-123"})
            ).status_code == 200
            assert (await authorize(client, _flip_checksum(made.full))).status_code == 401
            assert (await authorize(client, made.full, uri="/api/pull")).status_code == 403
    decisions = [e for e in logs if e["event"] == "authorize"]
    assert len(decisions) == 3
    ok, refused, blocked = decisions
    assert ok["outcome"] == "allowed"
    assert ok["tenant"] == made.record.tenant_name
    assert ok["key_prefix"] == made.record.prefix
    assert ok["route"] == "chat"
    assert ok["client_request_id"] == "abc-123"
    assert ok["request_id"] != "abc-123"
    assert isinstance(ok["latency_ms"], float)
    assert refused["outcome"] == "refused"
    assert refused["reason"] == "malformed"
    assert blocked["reason"] == "blocked"
    secret_part = made.full[11:]
    for entry in logs:
        assert secret_part not in repr(entry)
        assert "Bearer" not in repr(entry)


def test_request_ids_are_fresh_uuid4_hex() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for request_id in list(ids)[:100]:
        parsed = uuid.UUID(hex=request_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, request_id)


async def test_the_fast_path_and_litestars_route_decide_alike(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store, key=PolicySettings(rpm=1000))
    headers = {"x-forwarded-method": "POST", "x-forwarded-uri": "/api/chat"}
    async with running_app(settings, store) as (client, _):
        fast = await client.get("/authorize", headers=headers)  # no key: the 401
        routed = await client.get("/authorize/", headers=headers)  # through Litestar
        assert (
            (fast.status_code, fast.content)
            == (routed.status_code, routed.content)
            == (
                401,
                fast.content,
            )
        )
        # the same headers but for the request id each answer has of its own
        assert {k: v for k, v in fast.headers.items() if k != "x-request-id"} == {
            k: v for k, v in routed.headers.items() if k != "x-request-id"
        }
        assert fast.headers["x-request-id"] != routed.headers["x-request-id"]
        for path in ("/authorize", "/authorize/"):
            ok = await authorize_at(client, path, made.full)
            assert ok.status_code == 200
            identity = verify_identity(
                ok.headers[IDENTITY_HEADER], TEST_SECRET.encode(), int(time.time() * 1000)
            )
            assert identity.key_prefix == made.full[:11]


async def authorize_at(client: httpx.AsyncClient, path: str, key: str) -> httpx.Response:
    headers = {
        "x-forwarded-method": "POST",
        "x-forwarded-uri": "/api/chat",
        "authorization": f"Bearer {key}",
    }
    return await client.get(path, headers=headers)
