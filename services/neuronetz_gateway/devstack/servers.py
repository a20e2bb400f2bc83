"""Throwaway local Postgres and Redis servers, started from the binaries on PATH.

Used by ``neuronetz-gateway dev`` when ``NZ_DATABASE_URL`` / ``NZ_REDIS_URL``
are unset, and by the test harness (``tests/support/servers.py``), which also
stops and starts them to simulate outages. Postgres runs ``initdb`` as the
``postgres`` user when we are root (initdb refuses root).
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
from pathlib import Path

__all__ = [
    "MissingDependency",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "free_port",
    "wait_port",
]


class MissingDependency(RuntimeError):
    """Neither an env URL, local binaries nor Docker could provide a server."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``, or raise TimeoutError."""
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
    """A private Postgres cluster in a temp dir, on a free port; ``stop``/``start`` at will.

    ``detach=True`` runs the server in its own session, so a Ctrl-C on the
    terminal reaches only the process that owns it (the dev command), which
    then stops it in order.
    """

    def __init__(self, *, detach: bool = False) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise MissingDependency("initdb/pg_ctl not found on PATH or in /usr/lib/postgresql")
        self._pg_ctl = pg_ctl
        self._detach = detach
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
        """A superuser URL to the ``postgres`` database (trust authentication, loopback only)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        subprocess.run(  # noqa: S603 - argv is built here from binaries found on PATH
            self._prefix + argv,
            check=True,
            capture_output=True,
            cwd=self.dir,
            start_new_session=self._detach,
        )

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        log = self.dir / "server.log"
        self._run([self._pg_ctl, "-D", str(self.data), "-l", str(log), "-w", "-t", "30", "start"])
        wait_port(self.port, 30)

    def stop(self) -> None:
        """Stop the cluster (fast shutdown); ``start`` brings it back with its data."""
        self._run([self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        """Stop the cluster if it runs and delete its directory."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([self._pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """A private redis-server on a free port that keeps nothing on disk.

    ``detach=True``: its own session, as for :class:`ThrowawayPostgres`.
    """

    def __init__(self, port: int | None = None, *, detach: bool = False) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise MissingDependency("redis-server not found on PATH")
        self._binary = binary
        self._detach = detach
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it accepts connections."""
        self._proc = subprocess.Popen(  # noqa: S603 - argv is built here from a binary on PATH
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
            start_new_session=self._detach,
        )
        wait_port(self.port, 10)

    def stop(self) -> None:
        """Terminate the server (its data is gone; ``start`` gives an empty one)."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None

    destroy = stop
