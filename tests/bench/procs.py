"""What the benchmarked processes cost: CPU time and resident memory, read from ``/proc``.

A service is a process *tree* (Granian's main process and its workers, the
postmaster and its backends, LiteLLM's uvicorn), so every figure is summed
over the tree, found afresh at each reading.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLOCK_TICKS",
    "MachineCpu",
    "RssSampler",
    "ServiceProcess",
    "children_map",
    "cpu_seconds",
    "machine_cpu",
    "main_threads_cpu",
    "process_tree",
    "rss_bytes",
    "services_cpu",
    "services_main_thread_cpu",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents[int(entry.name)] = int(fields[1])  # field 4: ppid
    return parents


def children_map() -> dict[int, list[int]]:
    """Every live process's children: one scan of ``/proc`` (costly on a busy machine:
    100 ms with 230 processes under load), to share between the trees read at once."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    return children


def process_tree(root: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """``root`` and all its live descendants (``children``: a :func:`children_map` to reuse)."""
    if children is None:
        children = children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if (_PROC / str(pid)).exists():
            tree.append(pid)
            todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of the given processes (``utime + stime``), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ticks / CLOCK_TICKS


def main_threads_cpu(pids: Iterable[int]) -> float:
    """User + system CPU of the given processes' main threads only, in seconds.

    A Granian worker runs its Python (the event loop: the app) on its main
    thread, held to one core by the GIL, and its Rust I/O threads beside it on
    other cores: the main thread's CPU per request is what bounds its
    throughput, not the whole process's.
    """
    ticks = 0
    for pid in pids:
        try:
            raw = (_PROC / str(pid) / "task" / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def _status_kib(pid: int, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes(pids: Iterable[int], *, peak: bool = False) -> int:
    """Resident memory (``VmRSS``, or the kernel's high-water mark ``VmHWM``) summed, bytes."""
    name = "VmHWM" if peak else "VmRSS"
    return sum(_status_kib(pid, name) for pid in pids) * 1024


@dataclass(frozen=True, slots=True)
class ServiceProcess:
    """A measured service: a name and the root of its process tree."""

    name: str
    root_pid: int

    def pids(self, children: Mapping[int, list[int]] | None = None) -> list[int]:
        """The service's live processes."""
        return process_tree(self.root_pid, children)

    def cpu(self, children: Mapping[int, list[int]] | None = None) -> float:
        """CPU seconds used so far by the service's live processes."""
        return cpu_seconds(self.pids(children))

    def main_thread_cpu(self, children: Mapping[int, list[int]] | None = None) -> float:
        """CPU seconds used so far by the main threads of the service's live processes."""
        return main_threads_cpu(self.pids(children))


def services_cpu(services: Mapping[str, ServiceProcess]) -> dict[str, float]:
    """CPU seconds so far of each service, all read from one scan of ``/proc``."""
    children = children_map()
    return {name: service.cpu(children) for name, service in services.items()}


def services_main_thread_cpu(services: Mapping[str, ServiceProcess]) -> dict[str, float]:
    """CPU seconds so far of each service's main threads (see :func:`main_threads_cpu`)."""
    children = children_map()
    return {name: service.main_thread_cpu(children) for name, service in services.items()}


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """``/proc/stat``'s first line: busy and total jiffies of all cores."""

    busy: int
    total: int

    def utilisation_since(self, before: MachineCpu) -> float:
        """Share of all cores busy between ``before`` and this reading (0..1)."""
        total = self.total - before.total
        return (self.busy - before.busy) / total if total > 0 else 0.0

    def busy_seconds_since(self, before: MachineCpu) -> float:
        """CPU seconds spent by all cores, all processes, between ``before`` and now."""
        return (self.busy - before.busy) / CLOCK_TICKS


def machine_cpu() -> MachineCpu:
    """The machine's CPU counters now."""
    values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return MachineCpu(busy=total - idle, total=total)


@dataclass
class RssSampler:
    """Polls the resident memory of each service in a thread; keeps the peak per service.

    Polling (rather than ``VmHWM`` alone) sums a tree at the same instant, and
    counts only the window in which it runs: the throughput runs.
    """

    services: Mapping[str, ServiceProcess]
    interval: float = 0.2
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _sample(self) -> None:
        children = children_map()
        for name, service in self.services.items():
            value = rss_bytes(service.pids(children))
            if value > self.peaks.get(name, 0):
                self.peaks[name] = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
