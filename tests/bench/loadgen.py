"""Load generators: ``wrk`` for throughput and latency, aiohttp for stream timing.

``wrk`` (C, epoll, one thread) drives every throughput and latency cell, so
the client costs far less CPU than any server under test; its own CPU time
is read from ``wait4``'s rusage and reported beside the results. A small
aiohttp client, one request at a time, times streams chunk by chunk (time to
first chunk, gap between chunks), which wrk cannot see.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

__all__ = [
    "HttpTarget",
    "LoadgenError",
    "StreamTiming",
    "WrkResult",
    "ensure_wrk",
    "run_wrk",
    "time_stream",
]

_MARKER = "NZBENCH "


class LoadgenError(RuntimeError):
    """The load generator could not run, or its output could not be read."""


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """One request, repeated: where, how, and with what."""

    url: str
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run measured; latencies in milliseconds."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    timeouts: int
    loadgen_cpu_seconds: float

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx/3xx answer in time."""
        return self.non_2xx + self.socket_errors


def ensure_wrk() -> str:
    """The path of ``wrk``; installs Debian's package when it is missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise LoadgenError("wrk is not installed (Debian/Ubuntu: `apt-get install wrk`)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        [apt, "install", "-y", "-q", "wrk"], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:  # the package lists may be missing on a fresh image
        subprocess.run([apt, "update", "-q"], capture_output=True, env=env, check=False)
        result = subprocess.run(
            [apt, "install", "-y", "-q", "wrk"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    found = shutil.which("wrk")
    if found is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise LoadgenError("could not install wrk with apt-get: " + " / ".join(tail))
    return found


def _lua_string(value: str) -> str:
    """A Lua long-bracket literal that cannot be closed by ``value``."""
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    eq = "=" * level
    return f"[{eq}[{value}]{eq}]"


_DONE = (
    "done = function(summary, latency, requests)\n"
    "  io.write(string.format('" + _MARKER + '{"requests":%d,"duration_us":%d,'
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n\',\n'
    "    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,\n"
    "    summary.errors.write, summary.errors.status, summary.errors.timeout,\n"
    "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))\n"
    "end\n"
)


def _static_script(target: HttpTarget) -> str:
    lines = [f"wrk.method = {_lua_string(target.method)}"]
    if target.body is not None:
        lines.append(f"wrk.body = {_lua_string(target.body.decode())}")
    lines.extend(
        f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}"
        for name, value in target.headers.items()
    )
    return "\n".join(lines) + "\n" + _DONE


def _rotating_script(target: HttpTarget, header: str, values: Sequence[str], delay_ms: int) -> str:
    """Each request carries the next of ``values`` in ``header``; ``delay_ms`` paces each
    connection (wrk waits that long before every request), which bounds the rate."""
    table = ",\n".join(_lua_string(v) for v in values)
    fixed = "\n".join(
        f"  h[ {_lua_string(n)} ] = {_lua_string(v)}" for n, v in target.headers.items()
    )
    body = _lua_string(target.body.decode()) if target.body is not None else "nil"
    return (
        f"local values = {{\n{table}\n}}\n"
        "local i = 0\n"
        f"local body = {body}\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  local h = {}\n"
        f"{fixed}\n"
        f"  h[ {_lua_string(header)} ] = values[(i % #values) + 1]\n"
        f"  return wrk.format({_lua_string(target.method)}, nil, h, body)\n"
        "end\n"
        f"delay = function() return {int(delay_ms)} end\n" + _DONE
    )


def _parse(stdout: str, cpu: float) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            raw = json.loads(line[len(_MARKER) :])
            break
    else:
        raise LoadgenError(f"wrk printed no summary: {stdout.strip()[-300:]!r}")
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        seconds=seconds,
        rps=raw["requests"] / seconds if seconds else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        non_2xx=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        timeouts=raw["timeout"],
        loadgen_cpu_seconds=cpu,
    )


class WrkRun:
    """A wrk process started in the background; ``wait()`` returns its result."""

    def __init__(
        self,
        wrk: str,
        target: HttpTarget,
        *,
        connections: int,
        seconds: float,
        timeout_s: float = 10.0,
        rotate: tuple[str, Sequence[str]] | None = None,
        delay_ms: int = 0,
    ) -> None:
        script = (
            _rotating_script(target, rotate[0], rotate[1], delay_ms)
            if rotate
            else _static_script(target)
        )
        fd, path = tempfile.mkstemp(prefix="nzbench-", suffix=".lua")
        with os.fdopen(fd, "w") as f:
            f.write(script)
        self._script = Path(path)
        argv = [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(self._script),
            target.url,
        ]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait(self) -> WrkResult:
        """Block until wrk exits; the result includes wrk's own CPU time."""
        assert self._proc.stdout is not None
        stdout = self._proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(self._proc.pid, 0)
        self._proc.returncode = os.waitstatus_to_exitcode(status)
        self._script.unlink(missing_ok=True)
        if self._proc.returncode != 0:
            raise LoadgenError(f"wrk exited {self._proc.returncode}: {stdout.strip()[-300:]!r}")
        return _parse(stdout, usage.ru_utime + usage.ru_stime)


def run_wrk(
    wrk: str, target: HttpTarget, *, connections: int, seconds: float, timeout_s: float = 10.0
) -> WrkResult:
    """Run wrk (one thread, ``connections`` keep-alive connections) for ``seconds``."""
    return WrkRun(wrk, target, connections=connections, seconds=seconds, timeout_s=timeout_s).wait()


@dataclass(frozen=True, slots=True)
class StreamTiming:
    """One streamed answer, seen by the client: when each chunk arrived (seconds)."""

    status: int
    first_chunk: float
    gaps: tuple[float, ...]
    chunks: int


async def time_stream(
    session: aiohttp.ClientSession, target: HttpTarget, *, chunks: int
) -> StreamTiming:
    """Send ``target`` and time its first ``chunks`` non-empty lines (NDJSON or SSE ``data:``).

    Only content chunks count: the closing line(s) follow the last chunk at
    once and would put a near-zero "gap" into every distribution.
    """
    start = time.perf_counter()
    arrivals: list[float] = []
    async with session.request(
        target.method, target.url, headers=dict(target.headers), data=target.body
    ) as response:
        async for line in response.content:
            if line.strip() and len(arrivals) < chunks:
                arrivals.append(time.perf_counter())
        status = response.status
    if not arrivals:
        return StreamTiming(status=status, first_chunk=float("nan"), gaps=(), chunks=0)
    gaps = tuple(b - a for a, b in itertools.pairwise(arrivals))
    return StreamTiming(
        status=status, first_chunk=arrivals[0] - start, gaps=gaps, chunks=len(arrivals)
    )
