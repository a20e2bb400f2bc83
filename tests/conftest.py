"""Session fixtures: a fresh, migrated Postgres database and a Redis, both real.

Each run creates its own database (``nz_test_<pid>_<random>``) and drops only
that one. Redis keys are namespaced per run with ``NZ_REDIS_PREFIX``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from tests.support.redis_deployments import RedisDeployment, chosen_deployments, start_deployment
from tests.support.servers import postgres_admin_url, redis_url

TEST_SECRET = "test-secret-" + "x" * 40


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_admin_url() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database for this run, migrated; dropped at the end (ours only)."""
    name = f"nz_test_{os.getpid()}_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    url = _with_database(pg_admin_url, name)
    asyncio.run(apply_migrations(url))
    try:
        yield url
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def redis_test_url() -> Iterator[str]:
    with redis_url() as url:
        yield url


@pytest.fixture(scope="session")
def _started_redis_deployments() -> Iterator[dict[str, RedisDeployment]]:
    """Deployments started on first use and kept for the run (stopped at its end)."""
    started: dict[str, RedisDeployment] = {}
    try:
        yield started
    finally:
        for deployment in started.values():
            deployment.destroy()


@pytest.fixture(scope="session", params=chosen_deployments())
def redis_deployment(
    request: pytest.FixtureRequest,
    redis_test_url: str,
    _started_redis_deployments: dict[str, RedisDeployment],
) -> RedisDeployment:
    """Each Redis deployment (single, Cluster, Sentinel, TLS) in turn, for parametrised suites.

    ``single`` is the run's Redis; the others are started from the local
    binaries (``tests/support/redis_deployments.py``). ``NZ_TEST_REDIS_DEPLOYMENTS``
    narrows the list.
    """
    kind: str = request.param
    if kind == "single":
        return RedisDeployment(kind="single", url=redis_test_url, workdir=Path(os.devnull))
    deployment = _started_redis_deployments.get(kind)
    if deployment is None:
        deployment = _started_redis_deployments[kind] = start_deployment(kind)
    return deployment


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"nzt{secrets.token_hex(3)}"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    pool = await open_pool(database_url, min_size=1, max_size=5)
    try:
        yield Store(pool)
    finally:
        await pool.close()


def unique(name: str) -> str:
    """A name unique within this run (tests share one database)."""
    return f"{name}-{secrets.token_hex(4)}"
