"""One simulated GPU: parallel slots per loaded model, a bounded queue, cold loads, eviction.

What Ollama's scheduler does, reduced to what a gateway in front of it can
observe (``server/sched.go``, ``envconfig``):

- a loaded model runs at most ``slots`` requests at once
  (``OLLAMA_NUM_PARALLEL``); ``None`` means no limit (the simulator's
  default, so nothing waits unless asked to);
- a request for a model that is not loaded waits ``load_seconds`` for its
  load (every request waiting for that load shares it) and reports the
  load in ``load_duration``;
- at most ``max_loaded`` models are loaded (``OLLAMA_MAX_LOADED_MODELS``);
  loading another evicts the least recently used idle one, and waits for
  one to become idle when none is;
- at most ``max_queue`` requests wait, for a slot or a load, across the
  server (``OLLAMA_MAX_QUEUE``, 512); the next one gets Ollama's 503
  (:class:`ServerBusy`). Ollama itself bounds only the requests waiting to
  be scheduled and lets those of a loaded model wait on its semaphore; its
  documentation describes the bound as the server's queue, which is what is
  simulated here;
- a loaded model stays loaded ``keep_alive`` after its last request
  (default 5 minutes; ``0`` unloads it when idle, negative keeps it).

The knobs are read from the live :class:`~.app.SimulatorConfig` on every
decision, so ``POST /_sim/config`` changes them at run time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["BUSY_MESSAGE", "GpuKnobs", "GpuModel", "ServerBusy", "keep_alive_seconds"]

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
DEFAULT_KEEP_ALIVE_SECONDS = 300.0


class ServerBusy(Exception):
    """The queue is full: Ollama answers 503 with :data:`BUSY_MESSAGE`."""


class GpuKnobs(Protocol):
    """The configuration fields the GPU reads (the simulator's config has them)."""

    slots: int | None
    max_queue: int
    load_seconds: float
    max_loaded: int | None


def keep_alive_seconds(value: float | str | None) -> float:
    """Ollama's ``keep_alive`` as seconds: ``0`` unloads, negative is forever.

    A number is seconds; a string is a Go duration, of which the simulator
    reads the common forms (``"0"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"-1"``);
    anything else is the default.
    """
    if value is None or isinstance(value, bool):
        return DEFAULT_KEEP_ALIVE_SECONDS
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(int(value))
    text = value.strip()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h", ""):
        number = text.removesuffix(suffix) if suffix else text
        if suffix and number == text:
            continue
        try:
            seconds = float(number) * units.get(suffix, 1.0)
        except ValueError:
            continue
        return -1.0 if seconds < 0 else seconds
    return DEFAULT_KEEP_ALIVE_SECONDS


@dataclass(slots=True)
class _Runner:
    """One loaded (or loading) model."""

    ready: bool
    running: int = 0
    expires_at: float = math.inf
    last_used: float = 0.0


class GpuModel:
    """Admission to one simulated GPU (see the module docstring)."""

    def __init__(self, knobs: Callable[[], GpuKnobs]) -> None:
        self._knobs = knobs
        self._runners: dict[str, _Runner] = {}
        self._changed = asyncio.Event()
        self._loading: set[asyncio.Task[None]] = set()
        self.waiting = 0
        self.loads = 0
        #: requests that found every loaded model busy and waited for one to finish
        #: before their own could load (a load on a busy GPU costs more than the load)
        self.eviction_waits = 0

    # -- state ---------------------------------------------------------------

    def loaded(self) -> list[tuple[str, float]]:
        """The loaded models (canonical name, expiry as a UNIX time), longest-lived first."""
        self._expire(time.time())
        ready = [(name, r.expires_at) for name, r in self._runners.items() if r.ready]
        return sorted(ready, key=lambda item: -item[1])

    def preload(self, names: list[str]) -> None:
        """Mark models loaded now (start-up state)."""
        now = time.time()
        for name in names:
            self._runners[name] = _Runner(
                ready=True, expires_at=now + DEFAULT_KEEP_ALIVE_SECONDS, last_used=now
            )

    def forget_missing(self, installed: set[str]) -> None:
        """Drop runners of models no longer installed (the catalogue changed)."""
        for name in [n for n in self._runners if n not in installed]:
            del self._runners[name]
        self._notify()

    def reset(self) -> None:
        """Nothing loaded, nothing counted (``/_sim/reset``)."""
        for task in self._loading:
            task.cancel()
        self._loading.clear()
        self._runners.clear()
        self.loads = 0
        self.eviction_waits = 0
        self._notify()

    def knobs_changed(self) -> None:
        """Wake the waiters: more slots or a larger ``max_loaded`` may let them run."""
        self._notify()

    # -- admission -----------------------------------------------------------

    async def acquire(
        self, name: str, until_gone: Callable[[Awaitable[bool]], Awaitable[bool]] | None = None
    ) -> bool:
        """Take a slot of model ``name``, waiting for it; ``True`` when it had to be loaded.

        ``until_gone`` wraps each wait so that a client who leaves ends it
        (it raises). :class:`ServerBusy` when the request would wait while
        ``max_queue`` others already do.
        """
        cold = False
        queued = False
        blocked = False
        try:
            while True:
                self._expire(time.time())
                if self._runnable(name):
                    break
                cold |= self._start_load(name)
                blocked |= name not in self._runners  # every loaded model busy
                if self._runnable(name):
                    break
                if not queued:
                    if self.waiting >= self._knobs().max_queue:
                        raise ServerBusy(BUSY_MESSAGE)
                    self.waiting += 1
                    queued = True
                changed = self._changed
                wait = changed.wait()
                await (until_gone(wait) if until_gone is not None else wait)
        finally:
            if queued:
                self.waiting -= 1
                self.eviction_waits += blocked  # refused (503) ones are not counted
        runner = self._runners[name]
        runner.running += 1
        runner.last_used = time.time()
        return cold

    def release(self, name: str, keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS) -> None:
        """Give the slot back; the model stays loaded ``keep_alive`` seconds (see module)."""
        runner = self._runners.get(name)
        if runner is not None:
            runner.running = max(0, runner.running - 1)
            now = time.time()
            runner.last_used = now
            runner.expires_at = math.inf if keep_alive < 0 else now + keep_alive
            if keep_alive == 0 and runner.running == 0:
                del self._runners[name]
        self._notify()

    def unload(self, name: str) -> None:
        """``keep_alive: 0`` with no prompt: unload now, or when its requests end."""
        runner = self._runners.get(name)
        if runner is None:
            return
        if runner.running == 0:
            del self._runners[name]
            self._notify()
        else:
            runner.expires_at = time.time()

    # -- internals -----------------------------------------------------------

    def _runnable(self, name: str) -> bool:
        runner = self._runners.get(name)
        if runner is None or not runner.ready:
            return False
        slots = self._knobs().slots
        return slots is None or runner.running < slots

    def _start_load(self, name: str) -> bool:
        """Begin loading ``name`` if it is not loaded; ``True`` when it is (being) loaded cold."""
        runner = self._runners.get(name)
        if runner is not None:
            return not runner.ready
        knobs = self._knobs()
        if knobs.max_loaded is not None and len(self._runners) >= knobs.max_loaded:
            idle = [(r.last_used, n) for n, r in self._runners.items() if r.ready and not r.running]
            if not idle:
                return True  # every loaded model is busy: wait for one to finish
            del self._runners[min(idle)[1]]
        ready = knobs.load_seconds <= 0
        self._runners[name] = _Runner(ready=ready, last_used=time.time())
        self.loads += 1
        if not ready:
            task = asyncio.get_running_loop().create_task(self._finish_load(name, knobs))
            self._loading.add(task)
            task.add_done_callback(self._loading.discard)
        return True

    async def _finish_load(self, name: str, knobs: GpuKnobs) -> None:
        await asyncio.sleep(knobs.load_seconds)
        runner = self._runners.get(name)
        if runner is not None:
            runner.ready = True
            runner.expires_at = time.time() + DEFAULT_KEEP_ALIVE_SECONDS
        self._notify()

    def _expire(self, now: float) -> None:
        for name in [
            n for n, r in self._runners.items() if r.ready and not r.running and r.expires_at <= now
        ]:
            del self._runners[name]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
