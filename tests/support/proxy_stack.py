"""The simulator and the proxy as real servers (subprocesses on free ports) for tests.

The proxy runs exactly as in production, ``neuronetz-gateway serve proxy``
under Granian, configured by ``NZ_*`` variables; the simulator with
``python -m neuronetz_gateway.simulator``. Both log to files the tests may read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TEST_SECRET
from tests.support.servers import free_port

__all__ = ["ProxyServer", "SimulatorServer", "running_proxy", "running_simulator"]

_BIN = Path(sys.executable).parent

#: NZ_DISCOVERY_TTL_SECONDS of the test proxies
DISCOVERY_TTL = 0.3


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT, then SIGKILL; then SIGKILL to what is left of its process group: Granian's
    forked workers must not outlive a main process that did not stop in time (under load
    they did, as orphans still serving)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError):  # what is left of its group (start_new_session)
        os.killpg(proc.pid, signal.SIGKILL)


class SimulatorServer:
    """The Ollama simulator in a subprocess, with its control endpoints."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.models_changed = False

    def configure(self, **changes: Any) -> dict[str, Any]:
        self.models_changed = self.models_changed or "models" in changes
        reply = httpx.post(f"{self.url}/_sim/config", json=changes, timeout=5)
        reply.raise_for_status()
        return dict(reply.json())

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sim/reset", timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_sim/requests", timeout=5).json())

    def forwarded(self) -> list[dict[str, Any]]:
        """Recorded requests other than the proxy's own model discovery (``/api/tags``)."""
        return [r for r in self.requests() if r["path"] != "/api/tags"]

    def clear(self) -> None:
        httpx.delete(f"{self.url}/_sim/requests", timeout=5).raise_for_status()

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/_sim/stats", timeout=5).json())


class ProxyServer:
    """The proxy under Granian in a subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, spool: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.spool = spool
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def running_simulator(**env: str) -> Iterator[SimulatorServer]:
    """A simulator on a free port (``NZ_SIM_*`` overrides in ``env``)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="nz-sim-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "neuronetz_gateway.simulator", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/version", 20, proc, log)
        yield SimulatorServer(proc, port, log)
    finally:
        _stop(proc)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def running_proxy(
    *, database_url: str, redis_url: str, redis_prefix: str, ollama_url: str, **env: str
) -> Iterator[ProxyServer]:
    """``neuronetz-gateway serve proxy`` on a free port; ``env`` adds ``NZ_*`` settings."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="nz-proxy-"))
    log = workdir / "proxy.log"
    spool = workdir / "spool"
    settings = {
        "NZ_DATABASE_URL": database_url,
        "NZ_REDIS_URL": redis_url,
        "NZ_REDIS_PREFIX": redis_prefix,
        "NZ_OLLAMA_URL": ollama_url,
        "NZ_GATEWAY_SECRET": TEST_SECRET,
        "NZ_AUDIT_SPOOL_DIR": str(spool),
        "NZ_AUDIT_FLUSH_INTERVAL_SECONDS": "0.05",
        "NZ_DISCOVERY_TTL_SECONDS": str(DISCOVERY_TTL),
        "NZ_LOG_FORMAT": "json",
        "NZ_LOG_LEVEL": "info",
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(_BIN / "neuronetz-gateway"), "serve", "proxy", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **settings},
        )
    server = ProxyServer(proc, port, log, spool)
    try:
        _wait_http(f"{server.url}/healthz", 30, proc, log)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
