"""Discovery and health per backend, for a fleet: the generalisation of :mod:`.discovery`.

Every ``interval`` seconds (and at once when the directory changes) one
round runs over the directory's backends. For each, the replica that wins
the round's claim in Redis checks it (:class:`~neuronetz_gateway.adapters.
backend_check.HttpBackendChecker`: ``/api/tags``, ``/api/ps``) and publishes
the status (:class:`~neuronetz_gateway.adapters.backend_board.BackendBoard`);
the others read it. Redis away: each replica checks for itself (a cache, not
a dependency).

Each replica keeps a :class:`~neuronetz_gateway.domain.circuit_breaker.
CircuitBreaker` per backend, fed by every new status (the active check) and
by :meth:`FleetDiscovery.record` (the passive outcome of real requests:
connect errors, 5xx, timeouts). A backend is *healthy* when its last check
reached it and its breaker is not open; it is *usable* for new requests when
it is also active (not drained).

:meth:`FleetDiscovery.catalogue` answers what :class:`.discovery.ModelDiscovery`
answers for one upstream: the installed models, here the union over the
usable backends (so the effective set is allowed ∩ that union), from memory
with no I/O on the request path. No usable backend is
:class:`~.discovery.DiscoveryFailed` (503, fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from neuronetz_gateway.adapters.backend_board import BoardUnavailable
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.domain.circuit_breaker import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    Outcome,
)
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.discovery import Catalogue, DiscoveryFailed
from neuronetz_gateway.stopping import stop_task, wait_set

__all__ = ["BackendChecker", "BackendHealth", "Directory", "FleetDiscovery", "StatusBoard"]

log = get_logger(__name__)

#: A status nobody renewed for this many rounds is gone from Redis.
STATUS_ROUNDS = 3


class BackendChecker(Protocol):
    async def check(self, spec: BackendSpec) -> BackendStatus: ...


class StatusBoard(Protocol):
    """Where statuses are shared (:class:`~neuronetz_gateway.adapters.backend_board.BackendBoard`).

    Every method raises :class:`BoardUnavailable` when it cannot be asked.
    """

    async def claim_check(self, name: str, token: str, interval_ms: int) -> bool: ...

    async def publish(self, status: BackendStatus, ttl_ms: int) -> None: ...

    async def read(self, names: Sequence[str]) -> dict[str, BackendStatus]: ...


class Directory(Protocol):
    """What discovery needs of the backend directory."""

    @property
    def backends(self) -> tuple[BackendSpec, ...]: ...

    def on_change(self, callback: Callable[[tuple[BackendSpec, ...]], None]) -> None: ...


def _outcome(status: BackendStatus) -> Outcome:
    if status.reachable:
        return Outcome.SUCCESS
    if status.error == "connect_error":
        return Outcome.CONNECT_ERROR
    if status.error == "timeout":
        return Outcome.TIMEOUT
    return Outcome.SERVER_ERROR


class BackendHealth:
    """One backend as this replica sees it: spec, last status, breaker."""

    __slots__ = ("breaker", "spec", "status")

    def __init__(self, spec: BackendSpec, policy: BreakerPolicy) -> None:
        self.spec = spec
        self.status: BackendStatus | None = None
        self.breaker = CircuitBreaker(policy)

    def healthy(self, now: float) -> bool:
        """Reached by its last check, and its breaker not open."""
        return (
            self.status is not None
            and self.status.reachable
            and self.breaker.state(now) is not CircuitState.OPEN
        )

    def available(self, now: float) -> bool:
        """Reached by its last check, and its breaker lets a request through now: closed,
        or half-open with a trial free (routing; the pool then takes the trial)."""
        return self.status is not None and self.status.reachable and self.breaker.available(now)

    def usable(self, now: float) -> bool:
        """Healthy and active: may take a new request."""
        return self.spec.accepts_new and self.healthy(now)

    @property
    def installed(self) -> frozenset[str]:
        return self.status.installed_set if self.status else frozenset()

    @property
    def loaded(self) -> frozenset[str]:
        return self.status.loaded_set if self.status else frozenset()


class FleetDiscovery:
    """Per-backend discovery and health; the fleet's model catalogue (see the module)."""

    def __init__(
        self,
        directory: Directory,
        checker: BackendChecker,
        board: StatusBoard,
        *,
        interval_seconds: float,
        breaker_policy: BreakerPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._checker = checker
        self._board = board
        self._interval = interval_seconds
        self._interval_ms = max(1, int(interval_seconds * 1000))
        self._policy = breaker_policy or BreakerPolicy()
        self._now = monotonic
        self._token = secrets.token_hex(6)
        self._health: dict[str, BackendHealth] = {}
        self._catalogue: Catalogue | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._round_lock = asyncio.Lock()
        self.rounds = 0
        self._sync(directory.backends)
        directory.on_change(self._directory_changed)

    # -- what the proxy asks --------------------------------------------------

    async def catalogue(self) -> Catalogue:
        """The installed models of the usable backends (union), from memory."""
        if self.rounds == 0:
            await self.refresh()  # the first request of a fresh process: one round now
        catalogue = self._catalogue
        if catalogue is None or not self.usable():
            raise DiscoveryFailed("no backend is healthy")
        return catalogue

    def forget(self) -> None:
        """A backend said a model is missing: check again now rather than next round."""
        self._wake.set()

    def health(self) -> dict[str, BackendHealth]:
        """Every backend of the directory as this replica sees it (by name)."""
        return dict(self._health)

    def usable(self) -> list[BackendHealth]:
        now = self._now()
        return [h for h in self._health.values() if h.usable(now)]

    def backends_with(self, model: str) -> list[BackendHealth]:
        """The usable backends that have ``model`` installed (canonical or not)."""
        canonical = canonical_model(model)
        return [h for h in self.usable() if canonical in h.installed]

    def allow(self, backend: str) -> bool:
        """Whether a request may go to ``backend`` now; half-open, it takes one of the
        breaker's ``trial_requests`` (this replica's), so only that many go at a time."""
        health = self._health.get(backend)
        return health is not None and health.breaker.allow(self._now())

    def record(self, backend: str, outcome: Outcome) -> None:
        """A real request's outcome on ``backend`` (the passive health check)."""
        health = self._health.get(backend)
        if health is None:
            return
        before = health.breaker.state(self._now())
        after = health.breaker.record(outcome, self._now())
        if after is not before:
            log.warning("backend_circuit", backend=backend, state=after.value)
            self._rebuild()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Run rounds in the background (the first one at once)."""
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nz-fleet-discovery")

    async def stop(self) -> None:
        """Stop the rounds: by the flag and the wake too, waiting a bounded time only."""
        if self._task is not None:
            task, self._task = self._task, None
            self._stopping = True
            self._wake.set()
            await stop_task(task, within=self._interval + 5.0)

    async def refresh(self) -> None:
        """One round now (rounds do not overlap)."""
        async with self._round_lock:
            specs = list(self._directory.backends)
            statuses = await asyncio.gather(*(self._status_of(s) for s in specs))
            now = self._now()
            for spec, status in zip(specs, statuses, strict=True):
                health = self._health.get(spec.name)
                if health is None or health.spec.url != spec.url or status is None:
                    continue
                previous = health.status
                health.status = status
                if previous is None or status.checked_at != previous.checked_at:
                    health.breaker.record(_outcome(status), now)
            self.rounds += 1
            self._rebuild()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a round must never end the loop
                log.warning("fleet_discovery_round_failed", error=type(exc).__name__)
            if not self._stopping:
                await wait_set(self._wake, self._interval)

    # -- internals ------------------------------------------------------------

    async def _status_of(self, spec: BackendSpec) -> BackendStatus | None:
        """This round's status: checked here if this replica won the claim, else shared."""
        try:
            won = await self._board.claim_check(spec.name, self._token, self._interval_ms)
        except BoardUnavailable:
            return await self._checker.check(spec)  # Redis away: everyone checks for itself
        if won:
            status = await self._checker.check(spec)
            with contextlib.suppress(BoardUnavailable):
                await self._board.publish(status, self._interval_ms * STATUS_ROUNDS)
            return status
        try:
            shared = (await self._board.read([spec.name])).get(spec.name)
        except BoardUnavailable:
            shared = None
        if shared is not None and shared.url == spec.url:
            return shared
        known = self._health.get(spec.name)
        if known is not None and known.status is not None and known.status.url == spec.url:
            return known.status  # the winner has not published yet: last round's stands
        return await self._checker.check(spec)  # nothing known of it (just added): look now

    def _directory_changed(self, backends: tuple[BackendSpec, ...]) -> None:
        self._sync(backends)
        self._rebuild()
        self._wake.set()  # check new or changed backends now, not next round

    def _sync(self, backends: Sequence[BackendSpec]) -> None:
        fresh: dict[str, BackendHealth] = {}
        for spec in backends:
            health = self._health.get(spec.name)
            if health is None or health.spec.url != spec.url:
                health = BackendHealth(spec, self._policy)
            else:
                health.spec = spec  # slots, weight or state changed: keep status and breaker
            fresh[spec.name] = health
        self._health = fresh

    def _rebuild(self) -> None:
        entries: dict[str, dict[str, Any]] = {}
        for health in sorted(self.usable(), key=lambda h: h.spec.name):
            if health.status is None:
                continue
            for entry in health.status.tags:
                name = entry.get("name") or entry.get("model")
                canonical = canonical_model(name) if isinstance(name, str) else ""
                if canonical:
                    entries.setdefault(canonical, entry)
        self._catalogue = Catalogue(entries)
