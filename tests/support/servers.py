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
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MissingDependency",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "free_port",
    "postgres_admin_url",
    "redis_url",
]


class MissingDependency(RuntimeError):
    """Neither an env URL, local binaries nor Docker could provide a server."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user() -> list[str]:
    """A command prefix that runs as ``postgres`` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise MissingDependency(
            "running as root but there is no 'postgres' user to run initdb as"
        ) from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"]
    return ["su", "postgres", "-s", "/bin/sh", "-c"]  # pragma: no cover - Debian has runuser


class ThrowawayPostgres:
    """A private Postgres cluster in a temp dir, on a free port; ``stop``/``start`` at will."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise MissingDependency("initdb/pg_ctl not found on PATH or in /usr/lib/postgresql")
        self._pg_ctl = pg_ctl
        self._prefix = _as_postgres_user()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nz-pg-"))
        os.chmod(self.dir, 0o777)  # noqa: S103 - the postgres user must write its cluster here
        self.data = self.dir / "data"
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"])
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        self.start()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        subprocess.run(self._prefix + argv, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        log = self.dir / "server.log"
        self._run([self._pg_ctl, "-D", str(self.data), "-l", str(log), "-w", "-t", "30", "start"])
        _wait_port(self.port, 30)

    def stop(self) -> None:
        self._run([self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([self._pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """A private redis-server on a free port that keeps nothing on disk."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise MissingDependency("redis-server not found on PATH")
        self._binary = binary
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 10)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    destroy = stop


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
