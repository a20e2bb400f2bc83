"""A pool of backends behind the :class:`~neuronetz_gateway.proxy.ports.Upstream` port.

SPEC section 12. For each model call the pool

1. ranks the backends that can serve the model (``domain/routing.py``): the
   fleet's view (healthy, active, installed and loaded models, the loaded
   ones corrected by this replica's own routing, ``domain/residency.py``),
   from Redis each one's slots held and queue, and the service and load
   times learned from the answers (per model);
2. admits the call to the first candidate with a slot free at once, up to
   the warm backend worth waiting for (``Route.wait_at``), else to the fair
   queue of that one (or of the first)
   (:class:`~neuronetz_gateway.adapters.redis_slots.SlotAdmission`, for at
   most ``NZ_QUEUE_TIMEOUT_SECONDS``, then 503 with ``Retry-After`` in the
   surface's dialect);
3. forwards it; a refused or reset connection, or a 5xx (503 included),
   before the first byte is retried once on the next candidate (its slot on
   the first given back at once), and reported to the fleet (passive health);
4. holds the slot until the stream's ``release``/``abort`` (renewed meanwhile
   by one task per pool) and gives it back then.

Calls for no model (``/api/ps``, ``/api/version``) go to any healthy active
backend without a slot; model calls that generate nothing (``/api/show``) to
one that has the model, without a slot. When no backend can serve the call,
or every attempt failed to connect, the answer is 503 (``Retry-After: 1``), at
once. Metrics per backend here: slots held, queue depth and wait, tokens/s,
cold loads (``load_duration``), errors, failovers, health; in flight and time
to first token are the exchange's ``nz_proxy_backend_*``, labelled with the
backend's name through ``ModelCall.on_sent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from neuronetz_gateway.adapters.ollama_client import (
    OllamaClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    public_address,
)
from neuronetz_gateway.adapters.redis_slots import (
    QueueTimeout,
    SlotLease,
    SlotState,
    SlotsUnavailable,
)
from neuronetz_gateway.domain.model_call import ModelCall
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.domain.residency import Residency, Timings
from neuronetz_gateway.domain.routing import BackendView, Costs, Route, plan_route
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.discovery import Catalogue
from neuronetz_gateway.proxy.metrics import LabelCache
from neuronetz_gateway.proxy.ports import ModelCatalogue, UpstreamStream
from neuronetz_gateway.proxy.refusals import Refusal

__all__ = [
    "OUTCOMES",
    "SLOT_PATHS",
    "BackendPool",
    "DiscoveredFleet",
    "Fleet",
    "FleetCatalogue",
    "FleetUpstream",
    "HealthSource",
    "PoolMember",
    "PoolMetrics",
    "SlotPort",
    "StaticFleet",
]

log = get_logger("neuronetz_gateway.proxy.pool")

#: The native paths that run a model and so take one of the backend's slots.
SLOT_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
#: How a call to a backend went, as the pool reports it to the fleet (passive health;
#: the values of the circuit breaker's ``Outcome``).
SUCCESS, CONNECT_ERROR, SERVER_ERROR = "success", "connect_error", "server_error"
TIMEOUT = "timeout"
OUTCOMES = (SUCCESS, CONNECT_ERROR, SERVER_ERROR, TIMEOUT)
#: A load_duration above this (ns) counts as a cold load (a loaded model reports ~ms).
COLD_LOAD_NS = 250_000_000
#: A 5xx body read before failing over is cut here (it is only logged by kind).
_MAX_ERROR_BODY = 64 * 1024
_TAIL_BYTES = 2048


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One backend as the pool sees it now (from the fleet's directory and discovery)."""

    name: str
    url: str
    slots: int
    weight: int = 1
    active: bool = True  # False: draining, takes no new request
    healthy: bool = True  # the circuit breaker lets requests through
    installed: frozenset[str] = field(default_factory=frozenset)
    loaded: frozenset[str] = field(default_factory=frozenset)


class Fleet(Protocol):
    """Where the pool learns the backends and reports how its calls went."""

    def members(self) -> Sequence[PoolMember]:
        """The backends now (cheap: read on every call)."""
        ...

    def report(self, name: str, outcome: str) -> None:
        """Passive health: how a call to ``name`` went (one of :data:`OUTCOMES`)."""
        ...

    def take(self, name: str) -> bool:
        """Whether a call may be sent to ``name`` now (half-open: takes one of its trials)."""
        ...


class SlotPort(Protocol):
    """The slot admission the pool needs (``adapters/redis_slots.SlotAdmission``)."""

    async def acquire(
        self,
        backend: str,
        *,
        capacity: int,
        tenant: str,
        weight: int = 1,
        queue_timeout: float,
        on_queued: Callable[[int], None] | None = None,
    ) -> SlotLease: ...

    async def try_acquire(
        self, backend: str, *, capacity: int, tenant: str, weight: int = 1
    ) -> SlotLease | None: ...

    async def renew(self, lease: SlotLease) -> bool: ...

    async def release(self, lease: SlotLease, *, capacity: int) -> None: ...

    async def state(self, backend: str, *, capacity: int) -> SlotState: ...


class StaticFleet:
    """A fleet whose members are set by the caller (no backend table), with a simple breaker.

    A backend that failed ``failures_to_open`` calls in a row is unhealthy
    for ``open_seconds``; then one call may try it again. What the operator's
    backend table and per-backend discovery give (SPEC section 12) plugs in
    through the same :class:`Fleet` port.
    """

    def __init__(
        self,
        members: Sequence[PoolMember] = (),
        *,
        failures_to_open: int = 3,
        open_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._members = list(members)
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._threshold = failures_to_open
        self._open_seconds = open_seconds
        self._clock = clock

    def set_members(self, members: Sequence[PoolMember]) -> None:
        """Replace the backends (a backend added, removed, drained)."""
        self._members = list(members)

    def members(self) -> Sequence[PoolMember]:
        now = self._clock()
        return [
            m if self._open_until.get(m.name, 0.0) <= now else _with_health(m, healthy=False)
            for m in self._members
        ]

    def report(self, name: str, outcome: str) -> None:
        if outcome == SUCCESS:
            self._failures.pop(name, None)
            self._open_until.pop(name, None)
            return
        failures = self._failures[name] = self._failures.get(name, 0) + 1
        if failures >= self._threshold:
            self._open_until[name] = self._clock() + self._open_seconds
            self._failures[name] = self._threshold - 1  # after the pause, one more failure reopens

    def take(self, name: str) -> bool:
        return True  # its pause ends by itself (see the class)


class _BackendSpecView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def slots(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def accepts_new(self) -> bool: ...


class _HealthView(Protocol):
    @property
    def spec(self) -> _BackendSpecView: ...
    @property
    def installed(self) -> frozenset[str]: ...
    @property
    def loaded(self) -> frozenset[str]: ...
    def healthy(self, now: float) -> bool: ...
    def available(self, now: float) -> bool: ...


class HealthSource(Protocol):
    """Per-backend discovery and health (``proxy/fleet_discovery.FleetDiscovery``)."""

    def health(self) -> Mapping[str, _HealthView]: ...

    def record(self, backend: str, outcome: Any) -> None: ...

    def allow(self, backend: str) -> bool: ...


class DiscoveredFleet:
    """The :class:`Fleet` of the operator's backends, as per-backend discovery sees them.

    A member is healthy while its breaker lets a request through (closed, or
    half-open with a trial free); :meth:`take`, just before a call is sent,
    takes the trial, so a half-open backend gets ``trial_requests`` at a time
    from this replica and the rest go elsewhere (or get 503). ``outcome``
    turns the pool's outcome names into what ``source.record`` takes (the
    circuit breaker's ``Outcome``).
    """

    def __init__(
        self,
        source: HealthSource,
        outcome: Callable[[str], Any],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._outcome = outcome
        self._now = monotonic

    def members(self) -> Sequence[PoolMember]:
        now = self._now()
        return [
            PoolMember(
                h.spec.name,
                h.spec.url,
                h.spec.slots,
                h.spec.weight,
                h.spec.accepts_new,
                h.available(now),
                frozenset(canonical_model(m) for m in h.installed),
                frozenset(canonical_model(m) for m in h.loaded),
            )
            for h in self._source.health().values()
        ]

    def report(self, name: str, outcome: str) -> None:
        self._source.record(name, self._outcome(outcome))

    def take(self, name: str) -> bool:
        return self._source.allow(name)


def _with_health(member: PoolMember, *, healthy: bool) -> PoolMember:
    return PoolMember(
        member.name,
        member.url,
        member.slots,
        member.weight,
        member.active,
        healthy,
        member.installed,
        member.loaded,
    )


_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RATE_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 5000)


class PoolMetrics:
    """Per-backend figures of the pool, on the proxy's registry.

    What the exchange already counts per backend is not here: in flight and
    time to first token are ``nz_proxy_backend_in_flight`` and
    ``nz_proxy_backend_ttft_seconds`` (``proxy/metrics.py``), labelled with the
    backend the pool names through ``ModelCall.on_sent``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        #: ``child(metric, *labels)``: the labelled child, cached
        self.child = LabelCache()
        self.queue_depth = Gauge(
            "nz_proxy_pool_queue_depth",
            "Requests waiting for a slot on a backend, all replicas (at the last routing).",
            ("backend",),
            registry=registry,
        )
        self.slots_held = Gauge(
            "nz_proxy_pool_slots_held",
            "Slots held on a backend, all replicas (at the last routing).",
            ("backend",),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "nz_proxy_pool_queue_wait_seconds",
            "Time a request waited for a slot on a backend (0 when one was free).",
            ("backend",),
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "nz_proxy_pool_tokens_per_second",
            "Generation speed of an answer (eval_count / eval_duration).",
            ("backend",),
            buckets=_RATE_BUCKETS,
            registry=registry,
        )
        self.cold_loads = Counter(
            "nz_proxy_pool_cold_loads_total",
            "Answers whose model had to be loaded first (load_duration above 0.25 s).",
            ("backend",),
            registry=registry,
        )
        self.errors = Counter(
            "nz_proxy_pool_errors_total",
            "Backend failures by kind: connect, status, timeout, queue_timeout, slots_unavailable.",
            ("backend", "kind"),
            registry=registry,
        )
        self.failovers = Counter(
            "nz_proxy_pool_failovers_total",
            "Calls retried on another backend before the first byte, by the backend that failed.",
            ("backend",),
            registry=registry,
        )
        self.healthy = Gauge(
            "nz_proxy_pool_backend_healthy",
            "1 while the backend's circuit lets requests through, else 0.",
            ("backend",),
            registry=registry,
        )
        self.active = Gauge(
            "nz_proxy_pool_backend_active",
            "1 while the backend takes new requests, 0 while it is drained.",
            ("backend",),
            registry=registry,
        )


class _Final(msgspec.Struct):
    """The figures of Ollama's final stream line the metrics read."""

    load_duration: int | None = None
    total_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


_FINAL = msgspec.json.Decoder(_Final)


def _final_figures(tail: bytes) -> _Final | None:
    line = tail.rstrip().rsplit(b"\n", 1)[-1]
    if not line.startswith(b"{"):
        return None
    try:
        return _FINAL.decode(line)
    except msgspec.DecodeError:
        return None


class PooledStream:
    """A backend's answer that holds a slot until :meth:`release` / :meth:`abort`."""

    __slots__ = ("_done", "_on_done", "_response", "_tail", "member")

    def __init__(
        self,
        response: UpstreamResponse,
        member: PoolMember,
        on_done: Callable[[PooledStream, bytes | None], None],
    ) -> None:
        self._response = response
        self.member = member
        self._on_done = on_done
        self._tail = b""
        self._done = False

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def content_type(self) -> str:
        return self._response.content_type

    @property
    def backend(self) -> str:
        return public_address(self.member.url)

    async def read(self) -> bytes:
        data = await self._response.read()
        self._tail = data[-_TAIL_BYTES:]
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        async for data in self._response.chunks():
            self._tail = (self._tail + data)[-_TAIL_BYTES:]
            yield data

    def release(self) -> None:
        self._response.release()
        self._finish()

    def abort(self) -> None:
        self._response.abort()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._on_done(self, self._tail if self.status == 200 else None)


#: Times a call is routed again after its backend was withdrawn while it waited.
_REROUTES = 2


class _Withdrawn(Exception):
    """The backend that granted the slot no longer takes new calls (drained, removed)."""


class BackendPool:
    """The :class:`~neuronetz_gateway.proxy.ports.Upstream` of a fleet (see the module doc)."""

    def __init__(
        self,
        fleet: Fleet,
        slots: SlotPort,
        *,
        metrics: PoolMetrics,
        queue_timeout_seconds: float,
        lease_ttl_seconds: float,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        tenant_weight: Callable[[int], int] | None = None,
        residency_horizon_seconds: float = 10.0,
    ) -> None:
        self._fleet = fleet
        self._slots = slots
        self._metrics = metrics
        self._queue_timeout = queue_timeout_seconds
        self._renew_every = lease_ttl_seconds / 3
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tenant_weight = tenant_weight
        self._clients: dict[str, OllamaClient] = {}
        self._leases: dict[SlotLease, int] = {}  # held slot -> its backend's capacity
        self._background: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        #: the loaded models as our own routing knows them (the poll can be seconds old)
        self._residency = Residency(residency_horizon_seconds)
        #: per model (an installed one: routing sent it): service and load times learned
        self._timings: dict[str, Timings] = {}

    # the Upstream port -------------------------------------------------------------

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> PooledStream:
        """Route, admit, forward; fail over once before the first byte (module docstring).

        A call granted a slot by a backend drained or removed while it waited gives
        the slot back and is routed again, within what is left of its queue timeout.
        """
        started = time.monotonic()
        for _ in range(_REROUTES):
            try:
                return await self._open(call, path, body, started)
            except _Withdrawn:
                continue
        return await self._open(call, path, body, started)

    async def _open(
        self, call: ModelCall, path: str, body: bytes | None, started: float
    ) -> PooledStream:
        members = {m.name: m for m in self._fleet.members()}
        self._show_health(members.values())
        needs_slot = path in SLOT_PATHS
        route = await self._route(call, members.values(), needs_slot)
        target = route.first
        if target is None:
            raise _no_backend(call.model)
        attempts = 0
        connect_failed = True
        ready: tuple[str, SlotLease] | None = None
        if needs_slot:
            # the snapshot the route was ranked on is shared by concurrent arrivals: take
            # the first candidate with a slot free *now* (warm, then cold) before queueing
            ready = await self._first_free(call, route, members)
            if ready is not None:
                target = ready[0]
            elif route.wait_at is not None:
                target = route.wait_at  # a short wait where the model is loaded, not a load
        while target is not None:
            attempts += 1
            member = members[target]
            last = attempts == 2 or route.failover(target) is None
            lease: SlotLease | None = None
            if ready is not None:
                lease, ready = ready[1], None
            elif needs_slot:
                lease = await self._admit(call, member, started)
                if not self._takes_new(member.name):  # drained or removed while it waited
                    self._give_back(lease)
                    raise _Withdrawn
            stream = await self._attempt(call, member, path, body, lease)
            if stream is not None:
                if stream.status < 500 or last:
                    return stream  # a last 5xx: the backend's own error, translated
                connect_failed = False
                await self._discard(stream)
            if last:
                break
            self._metrics.child(self._metrics.failovers, member.name).inc()
            log.info("backend_failover", backend=member.name, request_id=call.request_id)
            target = route.failover(target)
        if connect_failed:
            raise _no_backend(call.model)
        raise UpstreamUnavailable("no backend answered")

    async def _attempt(
        self,
        call: ModelCall,
        member: PoolMember,
        path: str,
        body: bytes | None,
        lease: SlotLease | None,
    ) -> PooledStream | None:
        """One try on ``member``: its answer (5xx included), or ``None`` if it was unreachable
        (or half-open with its trials out)."""
        if not self._fleet.take(member.name):
            if lease is not None:
                self._give_back(lease)
            return None
        model = call.model if lease is not None else None  # canonical (ModelCall)
        if model is not None:
            # it is (being) loaded there from now: the next routing knows before the poll does
            self._residency.routed(member.name, model, time.monotonic())
        try:
            stream = await self._send(call, member, path, body, lease)
        except UpstreamUnavailable:
            if model is not None:
                self._residency.refused(member.name, model)
            self._metrics.child(self._metrics.errors, member.name, "connect").inc()
            self._fleet.report(member.name, CONNECT_ERROR)
            if lease is not None:
                self._give_back(lease)
            return None
        except UpstreamTimeout:
            # no failover: a slow answer's headers (a long load, a long non-streamed
            # answer) would run the whole request a second time elsewhere
            self._metrics.child(self._metrics.errors, member.name, "timeout").inc()
            self._fleet.report(member.name, TIMEOUT)
            if lease is not None:
                self._give_back(lease)
            raise
        except BaseException:
            if lease is not None:
                self._give_back(lease)
            raise
        if stream.status < 500:
            self._fleet.report(member.name, SUCCESS)
        else:
            if model is not None:
                self._residency.refused(member.name, model)
            self._metrics.child(self._metrics.errors, member.name, "status").inc()
            self._fleet.report(member.name, SERVER_ERROR)
        return stream

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        """Ready while at least one active, healthy backend answers ``/api/version``."""
        candidates = [m for m in self._fleet.members() if m.active and m.healthy]
        if not candidates:
            return False
        clients = [await self._client(m) for m in candidates]
        answers = await asyncio.gather(*(c.ping(limit_seconds) for c in clients))
        return any(answers)

    async def aclose(self) -> None:
        """Stop renewing, give back every slot still held, close the backend sessions."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        leases, self._leases = dict(self._leases), {}
        for lease, capacity in leases.items():
            with contextlib.suppress(SlotsUnavailable):
                await self._slots.release(lease, capacity=capacity)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    # steps ----------------------------------------------------------------------------

    async def _route(
        self, call: ModelCall, members: Iterable[PoolMember], needs_slot: bool
    ) -> Route:
        pool = list(members)
        if call.model is None:
            usable = [m for m in pool if m.active and m.healthy]
            usable.sort(key=lambda m: (-m.weight, m.name))
            return Route("", tuple(m.name for m in usable[:2]))
        model = call.model  # canonical once the model check passed (ModelCall)
        able = [m for m in pool if m.active and m.healthy and model in m.installed]
        states: list[SlotState | None] = [None] * len(able)
        if needs_slot and able:
            try:
                states = list(
                    await asyncio.gather(
                        *(self._slots.state(m.name, capacity=m.slots) for m in able)
                    )
                )
            except SlotsUnavailable:
                raise _slots_unavailable() from None
        views = []
        now = time.monotonic()
        for member, state in zip(able, states, strict=True):
            held = state.held if state is not None else 0
            queued = state.queued if state is not None else 0
            if state is not None:
                self._metrics.child(self._metrics.slots_held, member.name).set(held)
                self._metrics.child(self._metrics.queue_depth, member.name).set(queued)
            views.append(self._view(member, now, held, queued))
        # the others only say where the models are loaded (what a load would evict last)
        views += [self._view(m, now) for m in pool if m.active and m.healthy and m not in able]
        session = None if call.session is None else f"t{call.tenant_id}:{call.session}"
        timings = self._timings.get(model) or Timings()
        costs = Costs(timings.service_seconds, timings.load_seconds)
        return plan_route(model, views, session, costs)

    def _view(self, member: PoolMember, now: float, held: int = 0, queued: int = 0) -> BackendView:
        """``member`` as routing sees it: the polled loaded set corrected by our routing."""
        self._residency.polled(member.name, member.loaded)
        return BackendView(
            member.name,
            member.slots,
            installed=member.installed,
            loaded=self._residency.loaded(member.name, member.loaded, now),
            busy=held,
            queued=queued,
            weight=member.weight,
            models=self._residency.capacity(member.name),
            recent=self._residency.recent(member.name, now),
        )

    async def _first_free(
        self, call: ModelCall, route: Route, members: Mapping[str, PoolMember]
    ) -> tuple[str, SlotLease] | None:
        """The first ranked backend that grants a slot at once, trying none after the one
        worth waiting for (``None``: all tried are full)."""
        weight = self._weight(call)
        for name in route.candidates:
            member = members[name]
            try:
                lease = await self._slots.try_acquire(
                    name, capacity=member.slots, tenant=str(call.tenant_id), weight=weight
                )
            except SlotsUnavailable:
                raise self._capacity_unknown(name) from None
            if lease is not None:
                return name, self._hold(member, lease)
            if name == route.wait_at:
                break
        return None

    async def _admit(self, call: ModelCall, member: PoolMember, started: float) -> SlotLease:
        """A slot on ``member``, waiting in its fair queue for what is left of the timeout."""
        remaining = self._queue_timeout - (time.monotonic() - started)
        queued = call.on_queued
        try:
            lease = await self._slots.acquire(
                member.name,
                capacity=member.slots,
                tenant=str(call.tenant_id),
                weight=self._weight(call),
                queue_timeout=max(remaining, 0.001),
                on_queued=None if queued is None else lambda _position: queued(),
            )
        except QueueTimeout:
            self._metrics.child(self._metrics.errors, member.name, "queue_timeout").inc()
            self._metrics.child(self._metrics.queue_wait, member.name).observe(
                time.monotonic() - started
            )
            raise _queue_timed_out(self._queue_timeout) from None
        except SlotsUnavailable:
            raise self._capacity_unknown(member.name) from None
        return self._hold(member, lease)

    def _takes_new(self, name: str) -> bool:
        return any(m.name == name and m.active for m in self._fleet.members())

    def _weight(self, call: ModelCall) -> int:
        return self._tenant_weight(call.tenant_id) if self._tenant_weight is not None else 1

    def _hold(self, member: PoolMember, lease: SlotLease) -> SlotLease:
        """A slot granted (at once or from the queue): its wait counted, renewed from now on."""
        self._metrics.child(self._metrics.queue_wait, member.name).observe(lease.waited)
        self._leases[lease] = member.slots
        self._ensure_renewer()
        return lease

    def _capacity_unknown(self, name: str) -> Refusal:
        """Redis could not say whether ``name`` has a slot: fail closed (503)."""
        self._metrics.child(self._metrics.errors, name, "slots_unavailable").inc()
        return _slots_unavailable()

    async def _send(
        self,
        call: ModelCall,
        member: PoolMember,
        path: str,
        body: bytes | None,
        lease: SlotLease | None,
    ) -> PooledStream:
        client = await self._client(member)
        if call.on_sent is not None:
            call.on_sent(member.name)  # in flight there (nz_proxy_backend_in_flight)
        response = await client.send(
            "GET" if body is None else "POST",
            path,
            body,
            request_id=call.request_id,
            traceparent=call.traceparent,
        )

        model = call.model

        def done(stream: PooledStream, tail: bytes | None) -> None:
            self._stream_done(stream, lease, tail, model)

        return PooledStream(response, member, done)

    def _stream_done(
        self,
        stream: PooledStream,
        lease: SlotLease | None,
        tail: bytes | None,
        model: str | None,
    ) -> None:
        name = stream.member.name
        if lease is not None:
            self._give_back(lease)
        figures = _final_figures(tail) if tail else None
        if figures is None:
            return
        load_ns = figures.load_duration or 0
        timings = self._timings.setdefault(model, Timings()) if model else None
        if load_ns > COLD_LOAD_NS:
            self._metrics.child(self._metrics.cold_loads, name).inc()
            if timings is not None:
                timings.loaded(load_ns / 1e9)
        if figures.total_duration and timings is not None:
            timings.served((figures.total_duration - load_ns) / 1e9)
        if figures.eval_count and figures.eval_duration:
            rate = figures.eval_count / (figures.eval_duration / 1e9)
            self._metrics.child(self._metrics.tokens_per_second, name).observe(rate)

    async def _discard(self, stream: PooledStream) -> None:
        """Read a failed attempt's (small) body so its connection can be reused, then end it."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                total = 0
                async for data in stream.chunks():
                    total += len(data)
                    if total > _MAX_ERROR_BODY:
                        break
        except Exception:  # noqa: BLE001 - only the failover matters now
            stream.abort()
            return
        stream.release()

    async def _client(self, member: PoolMember) -> OllamaClient:
        client = self._clients.get(member.url)
        if client is None:
            client = OllamaClient(
                member.url,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
            self._clients[member.url] = client
        await client.open()
        return client

    def _give_back(self, lease: SlotLease) -> None:
        """Release a slot without waiting (``abort`` is synchronous); the task is kept."""
        capacity = self._leases.pop(lease, None)
        if capacity is None:
            return
        task = asyncio.ensure_future(self._release(lease, capacity))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, lease: SlotLease, capacity: int) -> None:
        try:
            await self._slots.release(lease, capacity=capacity)
        except SlotsUnavailable:
            # its TTL gives the slot back; nothing else can be done from here
            log.warning("slot_release_failed", backend=lease.backend)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_loop())

    async def _renew_loop(self) -> None:
        """Renew every held slot each third of the lease TTL, while any is held."""
        while self._leases and not self._closed:
            await asyncio.sleep(self._renew_every)
            leases = list(self._leases)
            results = await asyncio.gather(
                *(self._slots.renew(lease) for lease in leases), return_exceptions=True
            )
            for lease, result in zip(leases, results, strict=True):
                if result is False:
                    log.warning("slot_lease_lost", backend=lease.backend)

    def _show_health(self, members: Iterable[PoolMember]) -> None:
        for member in members:
            self._metrics.child(self._metrics.healthy, member.name).set(1 if member.healthy else 0)
            self._metrics.child(self._metrics.active, member.name).set(1 if member.active else 0)


class _Single(Protocol):
    async def open(self, call: ModelCall, path: str, body: bytes | None) -> UpstreamStream: ...

    async def ping(self, limit_seconds: float = 2.0) -> bool: ...


class FleetUpstream:
    """The pool while the operator has backends defined, else the one ``NZ_OLLAMA_URL``.

    ``use_pool()`` is asked on every call (the backend directory's
    ``from_database``), so a ``backend add`` switches a running proxy over
    within the directory's second, and removing the last backend switches it
    back, without a restart. With no backend defined the single upstream
    is today's path exactly (no slot admission), unless ``NZ_OLLAMA_SLOTS``
    is set: then ``use_pool()`` is true and the pool serves ``NZ_OLLAMA_URL``.
    """

    def __init__(self, single: _Single, pool: _Single, use_pool: Callable[[], bool]) -> None:
        self._single = single
        self._pool = pool
        self._use_pool = use_pool

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> UpstreamStream:
        """Through the pool or the single upstream (see the class)."""
        if self._use_pool():
            return await self._pool.open(call, path, body)
        return await self._single.open(call, path, body)

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        """Ready while the pool has a backend that answers (or the single upstream does)."""
        if self._use_pool():
            return await self._pool.ping(limit_seconds)
        return await self._single.ping(limit_seconds)


class FleetCatalogue:
    """The installed models: the fleet's union while backends are defined, else the one
    ``NZ_OLLAMA_URL``'s (``ModelCatalogue`` port; switched per call like :class:`FleetUpstream`)."""

    def __init__(
        self, single: ModelCatalogue, fleet: ModelCatalogue, use_fleet: Callable[[], bool]
    ) -> None:
        self._single = single
        self._fleet = fleet
        self._use_fleet = use_fleet

    async def catalogue(self) -> Catalogue:
        """The models of whichever upstream serves now."""
        if self._use_fleet():
            return await self._fleet.catalogue()
        return await self._single.catalogue()

    def forget(self) -> None:
        """A backend said a listed model is missing: both look again."""
        self._single.forget()
        self._fleet.forget()


def _no_backend(model: str | None) -> Refusal:
    what = f"model '{model}'" if model else "this request"
    return Refusal(
        503,
        "service_unavailable",
        f"no backend can serve {what} right now; try again shortly",
        retry_after=1,
    )


def _queue_timed_out(queue_timeout: float) -> Refusal:
    return Refusal(
        503,
        "service_unavailable",
        "every backend for this model is busy; try again shortly",
        retry_after=max(1, min(60, math.ceil(queue_timeout / 2))),
    )


def _slots_unavailable() -> Refusal:
    return Refusal(
        503,
        "service_unavailable",
        "backend capacity cannot be checked right now; try again shortly",
        retry_after=1,
    )
