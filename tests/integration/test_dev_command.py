"""``neuronetz-gateway dev`` for real: throwaway servers, the simulator, Caddy; then Ctrl-C.

Run as a new user would (no NZ_* variables), driven through the printed URL
and key, then stopped with SIGINT: every process it started must be gone,
and so must its data directories.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from neuronetz_gateway.devstack.servers import free_port

pytestmark = pytest.mark.integration

STARTUP_BUDGET = 25.0


def _read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """Everything ``proc`` writes (stdout and stderr merged) up to ``marker``.

    Raw reads on the descriptor: a buffered reader would hold lines back from ``select``.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if marker.encode() in seen:
                return seen.decode()
        elif proc.poll() is not None:
            break
    pytest.fail(f"dev did not print {marker!r} in {timeout}s:\n{seen.decode(errors='replace')}")


def _processes_in(directory: Path) -> set[int]:
    """Live processes whose working directory or command line mentions ``directory``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(directory)) or str(directory) in cmdline:
            found.add(int(entry.name))
    return found


def _redis_processes(port: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "redis-server" in cmdline and f":{port}" in cmdline:
                found.add(int(entry.name))
    return found


def test_dev_brings_up_a_working_gateway_and_ctrl_c_removes_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NZ_")}
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from neuronetz_gateway.cli.main import main; main()",
            "dev",
            "--simulator",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output = _read_until(proc, "Press Ctrl-C", STARTUP_BUDGET)
        up_after = time.monotonic() - started
        assert "BUNDLED OLLAMA SIMULATOR" in output
        assert f"up at http://127.0.0.1:{port}" in output
        key = re.search(r"demo key \(tenant 'demo', shown once\): (nz_\w+)", output)
        assert key, output
        state = Path(re.search(r"logs: (\S+)/logs", output).group(1))  # type: ignore[union-attr]
        pg_dir = Path(re.search(r"data in (\S+) ", output).group(1))  # type: ignore[union-attr]
        redis_port = int(re.search(r"Redis: 127\.0\.0\.1:(\d+)", output).group(1))  # type: ignore[union-attr]
        children = _processes_in(state) | _processes_in(pg_dir) | _redis_processes(redis_port)
        assert len(children) >= 6, "simulator, auth, proxy, caddy, postgres, redis"

        # The printed curl line, run as printed.
        curl = output[output.index("curl -sS") : output.index("or with the openai client")]
        result = subprocess.run(
            ["sh", "-c", curl.strip()], capture_output=True, text=True, timeout=20, check=True
        )
        assert '"chat.completion"' in result.stdout, result
        # Through Caddy only; a bad key is refused.
        refused = httpx.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer x"}
        )
        assert refused.status_code == 401
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {key.group(1)}"},
        )
        assert models.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    tail = rest.decode(errors="replace")
    assert proc.returncode == 0, tail
    assert "[dev] stopped" in tail
    assert not state.exists()
    assert not pg_dir.exists()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.1)
    left = {pid for pid in children if Path(f"/proc/{pid}").exists()}
    zombies = {
        pid
        for pid in left
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    }
    assert left - zombies == set()
    assert up_after < STARTUP_BUDGET
