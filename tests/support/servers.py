"""Real Postgres and Redis for the tests, from wherever they can be had.

Order: ``NZ_TEST_DATABASE_URL`` / ``NZ_TEST_REDIS_URL``; else throwaway
servers started from the binaries on PATH (``initdb`` as the ``postgres``
user when running as root); else testcontainers when a Docker engine
answers; else a clear failure naming what is missing.

The throwaway classes are also used directly by tests that stop and start a
server (Redis down → 503, Postgres down → spooled audit rows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

# The servers live in the package (the dev command uses them too); the names
# are re-exported here because tests import them from this module.
from neuronetz_gateway.devstack.servers import (
    MissingDependency,
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
)

__all__ = [
    "MissingDependency",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "free_port",
    "postgres_admin_url",
    "redis_url",
]


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    result = subprocess.run([docker, "info"], capture_output=True, timeout=10, check=False)
    return result.returncode == 0


@contextlib.contextmanager
def postgres_admin_url() -> Iterator[str]:
    """A Postgres URL on which we may create and drop our own databases."""
    env = os.environ.get("NZ_TEST_DATABASE_URL")
    if env:
        yield env
        return
    try:
        server = ThrowawayPostgres()
    except MissingDependency as local_error:
        if not _docker_answers():
            raise MissingDependency(
                f"no Postgres for the tests: NZ_TEST_DATABASE_URL is unset, {local_error}, "
                "and no Docker engine answers for testcontainers"
            ) from None
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    try:
        yield server.admin_url
    finally:
        server.destroy()


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """A Redis URL for the tests (callers namespace their keys per run)."""
    env = os.environ.get("NZ_TEST_REDIS_URL")
    if env:
        yield env
        return
    try:
        server = ThrowawayRedis()
    except MissingDependency as local_error:
        if not _docker_answers():
            raise MissingDependency(
                f"no Redis for the tests: NZ_TEST_REDIS_URL is unset, {local_error}, "
                "and no Docker engine answers for testcontainers"
            ) from None
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    try:
        yield server.url
    finally:
        server.destroy()
