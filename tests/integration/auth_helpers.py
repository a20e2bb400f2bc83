"""Shared pieces of the auth service's integration tests (not a test module).

Keys are created straight through the :class:`Store` with a cheap Argon2
hasher (the service under test uses the same parameters, so no rehash
happens unless a test wants one); tenants get unique names per test.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.ledger_census import LedgerBeacon
from neuronetz_gateway.adapters.postgres.store import KeyRecord, Store
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_commands import command_channel
from neuronetz_gateway.auth.app import AuthService, create_app
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from neuronetz_gateway.settings import Secret, Settings, load_settings
from tests.conftest import TEST_SECRET, unique

__all__ = [
    "CHEAP_ARGON2",
    "MadeKey",
    "authorize",
    "cheap_hasher",
    "make_key",
    "make_settings",
    "running_app",
    "writer_next_door",
]

CHEAP_ARGON2: dict[str, int] = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


def cheap_hasher(max_concurrency: int = 2) -> KeyHasher:
    """Argon2id with tiny parameters: the tests count verifications, not their cost."""
    return KeyHasher(max_concurrency, **CHEAP_ARGON2)


def make_settings(
    database_url: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Settings:
    """Settings for an app under test (nothing read from the environment)."""
    overrides.setdefault("gateway_secret", Secret(TEST_SECRET))
    return load_settings(
        {},
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        **overrides,
    )


@dataclass(frozen=True)
class MadeKey:
    full: str
    record: KeyRecord


async def make_key(
    store: Store,
    *,
    tenant: PolicySettings | None = None,
    key: PolicySettings | None = None,
    tenant_name: str | None = None,
    expires_at: datetime | None = None,
    hasher: KeyHasher | None = None,
    fingerprint_secret: bytes | None = None,
) -> MadeKey:
    """A new key (and a new tenant unless ``tenant_name`` names an existing one).

    Hash-only, like a key made by a CLI without ``NZ_GATEWAY_SECRET``, unless
    ``fingerprint_secret`` is given (what the CLI stores when it has the secret).
    """
    if tenant_name is None:
        tenant_name = unique("tenant")
        await store.create_tenant(tenant_name, tenant or PolicySettings())
    parsed = generate_key()
    record = await store.create_key(
        tenant_name=tenant_name,
        name=unique("key"),
        prefix=parsed.prefix,
        secret_hash=(hasher or cheap_hasher()).hash(parsed.full),
        policy=key or PolicySettings(),
        expires_at=expires_at,
        log_prompts=False,
        prompt_ttl_days=None,
        secret_fingerprint=(
            None
            if fingerprint_secret is None
            else FingerprintKeys(fingerprint_secret).make(parsed.full)
        ),
    )
    return MadeKey(parsed.full, record)


@asynccontextmanager
async def running_app(
    settings: Settings, store: Store, hasher: KeyHasher | None = None, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AuthService]]:
    """The app in-process with its lifespan run; yields the client and its collaborators.

    An audit writer reports to the ledger census next to it, as the proxy's
    does in a deployment (budgets are rebuilt only once the census says the
    ledger is complete).
    """
    app = create_app(settings, store=store, hasher=hasher or cheap_hasher(), **options)
    # the app runs on this event loop (litestar's test client would use a thread of
    # its own, and the store's pool belongs to this loop)
    async with app.lifespan(), writer_next_door(settings, store):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            service: AuthService = app.state.auth
            if service.listener is not None:
                assert await service.listener.wait_listening(5.0)
            yield client, service


@asynccontextmanager
async def writer_next_door(settings: Settings, store: Store) -> AsyncIterator[AuditWriter]:
    """A real audit writer and its ledger beacon on ``settings``' Redis prefix."""
    redis = await open_redis(settings.redis_url, ca_file=settings.redis_ca_file or None)
    commands = command_channel(redis, 5.0)
    with tempfile.TemporaryDirectory(prefix="nz-spool-") as spool:
        writer = AuditWriter(store.pool, spool)
        await writer.start()
        beacon = LedgerBeacon(commands, prefix=settings.redis_prefix, writer=writer)
        await beacon.start()
        try:
            yield writer
        finally:
            await writer.stop()
            await beacon.stop()
            await commands.aclose()
            await close_redis(redis)


async def authorize(
    client: httpx.AsyncClient,
    key: str | None,
    *,
    method: str = "POST",
    uri: str = "/api/chat",
    header: str = "authorization",
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    """One forward_auth call as Caddy makes it."""
    headers = {"x-forwarded-method": method, "x-forwarded-uri": uri, **(extra or {})}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    return await client.get("/authorize", headers=headers)


def random_request_id() -> str:
    return secrets.token_hex(8)
