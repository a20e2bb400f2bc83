"""Revocation reaches every running auth instance within a second; a listener gap
flushes the caches instead of trusting them."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.auth.revocation import APPLICATION_NAME
from neuronetz_gateway.settings import Settings
from tests.integration.auth_helpers import authorize, make_key, make_settings, running_app

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "neuronetz-gateway")


@pytest.fixture
def settings(database_url: str, redis_test_url: str, redis_prefix: str) -> Settings:
    return make_settings(database_url, redis_test_url, redis_prefix)


async def _refused_within(client: httpx.AsyncClient, key: str, seconds: float) -> float:
    """Poll until the key is refused; return how long it took (fails past ``seconds``)."""
    started = time.monotonic()
    while (await authorize(client, key)).status_code != 401:
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"still accepted after {elapsed:.2f} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_revoke_key_cli_reaches_two_instances_within_a_second(
    settings: Settings, store: Store, database_url: str
) -> None:
    made = await make_key(store)
    async with (
        running_app(settings, store) as (first, _),
        running_app(settings, store) as (second, _),
    ):
        for client in (first, second):  # warm both: in-process and Redis caches
            for _ in range(3):
                assert (await authorize(client, made.full)).status_code == 200
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "revoke-key",
            "--prefix",
            made.record.prefix,
            env={**os.environ, "NZ_DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert made.record.prefix in out.decode()
        lags = await asyncio.gather(
            _refused_within(first, made.full, 1.0), _refused_within(second, made.full, 1.0)
        )
        assert max(lags) < 1.0
        for client in (first, second):
            assert (await authorize(client, made.full)).status_code == 401


async def test_a_tenant_change_evicts_its_keys(settings: Settings, store: Store) -> None:
    made = await make_key(store)
    async with running_app(settings, store) as (client, _):
        assert (await authorize(client, made.full)).status_code == 200
        await store.update_tenant_policy(made.record.tenant_name, {"rpm": 1})
        started = time.monotonic()
        # the new limit applies as soon as the cached policy is gone
        while (await authorize(client, made.full)).status_code == 200:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.01)
        assert (await authorize(client, made.full)).status_code == 429


async def test_after_a_listener_gap_nothing_cached_is_trusted(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store)
    async with running_app(settings, store) as (client, service):
        assert service.listener is not None
        assert (await authorize(client, made.full)).status_code == 200
        # a revocation whose notification is lost (as it would be during a gap)
        async with store.pool.acquire() as conn, conn.transaction():
            await conn.execute("ALTER TABLE api_key DISABLE TRIGGER api_key_changed")
            await conn.execute(
                "UPDATE api_key SET revoked_at = now() WHERE prefix = $1", made.record.prefix
            )
            await conn.execute("ALTER TABLE api_key ENABLE TRIGGER api_key_changed")
        assert (await authorize(client, made.full)).status_code == 200  # stale, cached
        flushes_before = _metric(await client.get("/metrics"), "nz_auth_key_cache_flushes_total")
        # the listener's connection dies: it must reconnect and flush
        killed = await store.pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        assert killed >= 1
        started = time.monotonic()
        while (await authorize(client, made.full)).status_code == 200:
            assert time.monotonic() - started < 5.0
            await asyncio.sleep(0.02)
        assert await service.listener.wait_listening(5.0)
        metrics = await client.get("/metrics")
        assert _metric(metrics, "nz_auth_key_cache_flushes_total") > flushes_before
        assert _metric(metrics, "nz_auth_key_listener_up") == 1.0
        assert (await authorize(client, made.full)).status_code == 401


def _metric(response: httpx.Response, name: str) -> float:
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
