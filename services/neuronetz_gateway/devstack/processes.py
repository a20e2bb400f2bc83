"""Child processes of the dev stack: start in their own session, log to a file, stop in order.

Each child gets its own session (process group), so a Ctrl-C on the terminal
reaches only the dev command, which then stops the children one by one
(Caddy first, the databases last) instead of all of them at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = [
    "ManagedProcess",
    "ProcessDied",
    "StartupTimeout",
    "pick_port",
    "wait_until",
]

#: How long a child gets between SIGTERM and SIGKILL.
STOP_GRACE_SECONDS = 10.0


class ProcessDied(RuntimeError):
    """A child exited while the stack needed it; the message has its log's tail."""


class StartupTimeout(RuntimeError):
    """A child did not become ready in time."""


def _port_is_free(port: int, host: str) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(preferred: int, *, host: str = "127.0.0.1", taken: Sequence[int] = ()) -> int:
    """``preferred`` when it is free on ``host``, else any free port (never one in ``taken``)."""
    if preferred and preferred not in taken and _port_is_free(preferred, host):
        return preferred
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            return port


class ManagedProcess:
    """One child: started detached, output in ``log_path``, stopped by process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        quiet_stdout: bool = False,
    ) -> None:
        """``quiet_stdout`` drops stdout (e.g. Caddy's access log under load), keeps stderr."""
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - argv is built by the dev stack
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if quiet_stdout else log,
                stderr=log if quiet_stdout else subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self._proc.pid

    def running(self) -> bool:
        """Whether the child is still alive."""
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited."""
        return self._proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the child's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`ProcessDied` (with the log's tail) if the child has exited."""
        code = self._proc.poll()
        if code is not None:
            raise ProcessDied(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL what is left."""
        if self.running():
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(5)
        # Granian's workers or Caddy's helpers must not outlive the main process.
        self._signal_group(signal.SIGKILL)


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    watch: Sequence[ManagedProcess] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Poll ``ready`` until true; fail fast when a watched child dies or a stop is requested."""
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in watch:
            proc.check_alive()
        if should_stop():
            raise InterruptedError("stop requested")
        if time.monotonic() > deadline:
            raise StartupTimeout(f"{what} was not ready after {timeout:.0f}s")
        time.sleep(0.1)


def http_status(url: str, *, timeout: float = 1.0, headers: Mapping[str, str] | None = None) -> int:
    """The status of ``GET url``, or 0 when nothing answers."""
    try:
        return httpx.get(url, timeout=timeout, headers=dict(headers or {})).status_code
    except httpx.HTTPError:
        return 0


__all__ += ["http_status"]
