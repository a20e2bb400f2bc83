"""Backend slots as Redis leases, and a queue fair across tenants for when none is free.

SPEC section 12. Every key of one backend shares the hash tag ``{b<backend>}``
(one Redis Cluster slot, so each script touches one slot)::

    <prefix>:{b<backend>}:slots   ZSET lease id -> expiry ms
    <prefix>:{b<backend>}:queue   ZSET ticket -> start tag (fair order)
    <prefix>:{b<backend>}:alive   ZSET ticket -> deadline ms (waiters that stop polling drop)
    <prefix>:{b<backend>}:meta    HASH virtual time, arrival counter, tenants' finish tags
    <prefix>:{b<backend>}:wake    STREAM tickets just handed a slot

A slot is a lease like a concurrency lease (SPEC section 5): renewed while a
stream runs (:meth:`SlotAdmission.renew`), released when it ends or the
client leaves (:meth:`SlotAdmission.release`), and recovered by its TTL after
a crash. When no slot is free the request takes a ticket in the backend's
queue: ``lua/slots.lua`` orders tickets by start-time fair queuing (a tenant's
tag is ``max(virtual time, its last finish tag)``; cost ``1/weight``), so a
tenant with many requests waiting does not make another wait behind all of
them. Whoever frees a slot hands it, in the same script, to the queue's head
and appends the ticket to the wake stream; one waker task per backend and
process reads that stream with a blocking ``XREAD`` (bounded, 0.4 s) and
wakes the local waiter. Waiters also poll once a second (which keeps their
ticket alive and picks up slots freed by a TTL); a waiter that stops polling
(a crashed replica) loses its ticket after ``grace_seconds``, and a slot
handed to it is given back after as long. A waiter that gives up (timeout,
client gone) removes its ticket; if a slot had just been handed to it, that
slot goes on to the next.

Errors::

    Exception
    ├── SlotsUnavailable   Redis could not be asked in time: fail closed (503)
    └── QueueTimeout       no slot came free within the queue timeout (503 + Retry-After)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, RedisError

from neuronetz_gateway.adapters.redis_client import RedisClient
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis, RedisArg
from neuronetz_gateway.stopping import stop_task

__all__ = ["QueueTimeout", "SlotAdmission", "SlotLease", "SlotState", "SlotsUnavailable"]

T = TypeVar("T")

_TEXT = files("neuronetz_gateway.adapters").joinpath("lua").joinpath("slots.lua").read_text("utf-8")
_SHA = hashlib.sha1(_TEXT.encode()).hexdigest()  # noqa: S324 - Redis's script id
#: Wakes kept per backend for waiters not registered yet (most are other replicas').
_MAX_EARLY_WAKES = 1024
#: Tenant weights are whole numbers in this range (cost per request = 1/weight).
MAX_WEIGHT = 1000


class SlotsUnavailable(Exception):
    """Redis could not be asked: fail closed (503)."""


class QueueTimeout(Exception):
    """No slot came free in time; ``waited`` seconds, ``position`` in the queue at the end."""

    def __init__(self, backend: str, waited: float, position: int) -> None:
        super().__init__(f"no slot on {backend} within {waited:.1f}s (position {position})")
        self.backend = backend
        self.waited = waited
        self.position = position


@dataclass(frozen=True, slots=True)
class SlotLease:
    """A slot held on ``backend``: renew it while the request runs, release it after."""

    backend: str
    lease_id: str
    waited: float = 0.0  # seconds spent in the queue (0: a slot was free)


@dataclass(frozen=True, slots=True)
class SlotState:
    """A backend's slots held now and requests waiting for one."""

    held: int
    queued: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Keys:
    __slots__ = ("keys", "wake")

    def __init__(self, prefix: str, backend: str) -> None:
        base = f"{prefix}:{{b{backend}}}"
        self.keys = [f"{base}:slots", f"{base}:queue", f"{base}:alive", f"{base}:meta"]
        self.wake = f"{base}:wake"
        self.keys.append(self.wake)


class SlotAdmission:
    """Slot leases and the fair queue of every backend, exact across proxy replicas.

    Scripts go over the pipelined connection when the client is one server
    (as the limiter's), else through redis-py (Cluster, Sentinel); the
    wakers' blocking reads always go through redis-py (a blocked read must
    not hold up the pipeline). Call :meth:`aclose` when done. ``fair=False``
    queues in arrival order (FIFO), the baseline fairness is measured against.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = "nz",
        clock: Callable[[], float] = time.time,
        lease_ttl_seconds: float = 60.0,
        grace_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        wake_block_seconds: float = 0.4,
        timeout_seconds: float = 1.0,
        fair: bool = True,
    ) -> None:
        if min(lease_ttl_seconds, grace_seconds, poll_seconds, timeout_seconds) <= 0:
            raise ValueError("TTLs, intervals and timeouts must be positive")
        if poll_seconds >= grace_seconds:
            raise ValueError("waiters must poll more often than their grace period")
        self._redis = redis
        self._pipelined = PipelinedRedis.for_client(redis, timeout_seconds)
        self._prefix = prefix
        self._clock = clock
        self._ttl_ms = int(lease_ttl_seconds * 1000)
        self._grace_ms = int(grace_seconds * 1000)
        self._poll = poll_seconds
        self._block_ms = max(int(wake_block_seconds * 1000), 1)
        self._timeout = timeout_seconds
        self._keys: dict[str, _Keys] = {}
        self._unique = secrets.token_hex(6)
        self._sequence = itertools.count()
        # backend -> ticket -> the future its waker resolves
        self._waiters: dict[str, dict[str, asyncio.Future[None]]] = {}
        self._wakers: dict[str, asyncio.Task[None]] = {}
        # wakes read before their waiter was registered (the acquire's reply and the
        # wake stream come back on different connections, in either order)
        self._early: dict[str, dict[str, None]] = {}
        self._closed = False
        # fair=False: every tag equal, so arrival order (FIFO); the baseline fairness is
        # measured against (tests, bench)
        self._fair = fair

    # public API -----------------------------------------------------------------

    async def acquire(
        self,
        backend: str,
        *,
        capacity: int,
        tenant: str,
        weight: int = 1,
        queue_timeout: float,
        on_queued: Callable[[int], None] | None = None,
    ) -> SlotLease:
        """Take one of ``backend``'s ``capacity`` slots, waiting fairly up to ``queue_timeout`` s.

        ``on_queued(position)`` is called once if the request has to wait.
        Raises :class:`QueueTimeout` when no slot came in time and
        :class:`SlotsUnavailable` when Redis cannot be asked; cancelling the
        call (the client left) gives the place (or a slot just handed over) back.
        """
        if capacity <= 0:
            raise ValueError("a backend needs at least one slot")
        cost = 1.0 / min(max(int(weight), 1), MAX_WEIGHT) if self._fair else 0.0
        started = time.monotonic()
        nonce = f"{self._unique}{next(self._sequence):x}"
        reply = await self._script(backend, "acquire", capacity, nonce, tenant, repr(cost))
        status, ticket = _text(reply[0]), _text(reply[1])
        if status == "granted":
            return SlotLease(backend, ticket)
        if on_queued is not None:
            on_queued(int(reply[3]))
        return await self._wait(
            backend, capacity, ticket, _text(reply[4]), started, queue_timeout, tenant, cost
        )

    async def try_acquire(
        self, backend: str, *, capacity: int, tenant: str, weight: int = 1
    ) -> SlotLease | None:
        """A slot on ``backend`` if one is free now (nobody queued), else ``None`` at once.

        Two round trips when it is not free (the ticket taken is given back
        at once); the tenant's finish tag still moves by one request's cost.
        """
        if capacity <= 0:
            raise ValueError("a backend needs at least one slot")
        cost = 1.0 / min(max(int(weight), 1), MAX_WEIGHT) if self._fair else 0.0
        nonce = f"{self._unique}{next(self._sequence):x}"
        reply = await self._script(backend, "acquire", capacity, nonce, tenant, repr(cost))
        ticket = _text(reply[1])
        if _text(reply[0]) == "granted":
            return SlotLease(backend, ticket)
        await self._script(backend, "release", capacity, ticket)
        return None

    async def renew(self, lease: SlotLease) -> bool:
        """Extend a held slot by the lease TTL from now; ``False`` if it had already expired."""
        reply = await self._script(lease.backend, "renew", 0, lease.lease_id)
        return int(reply) == 1

    async def release(self, lease: SlotLease, *, capacity: int) -> None:
        """Give the slot back (idempotent); the queue's head gets it at once."""
        await self._script(lease.backend, "release", capacity, lease.lease_id)

    async def state(self, backend: str, *, capacity: int) -> SlotState:
        """Slots held and requests queued on ``backend`` (expired leases dropped first)."""
        reply = await self._script(backend, "state", capacity, "")
        return SlotState(int(reply[0]), int(reply[1]))

    async def ping(self) -> bool:
        """Whether Redis answers (never raises)."""
        try:
            await self._call(self._execute("PING"))
        except SlotsUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the wakers and close the pipelined connection (the redis-py client stays)."""
        self._closed = True  # the wake loops end by this flag too (a swallowed cancel)
        wakers, self._wakers = list(self._wakers.values()), {}
        for task in wakers:
            await stop_task(task, within=self._block_ms / 1000 + self._poll + 2.0)
        if self._pipelined is not None:
            await self._pipelined.aclose()

    # waiting ------------------------------------------------------------------------

    async def _wait(
        self,
        backend: str,
        capacity: int,
        ticket: str,
        last_wake: str,
        started: float,
        queue_timeout: float,
        tenant: str,
        cost: float,
    ) -> SlotLease:
        loop = asyncio.get_running_loop()
        waiters = self._waiters.setdefault(backend, {})
        woken: asyncio.Future[None] = loop.create_future()
        waiters[ticket] = woken
        if self._early.get(backend, {}).pop(ticket, False) is None:
            woken.set_result(None)
        self._ensure_waker(backend, last_wake)
        deadline = started + queue_timeout
        granted = False
        position = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueTimeout(backend, time.monotonic() - started, position)
                # asyncio.wait leaves ``woken`` alone and never swallows a cancellation
                await asyncio.wait({woken}, timeout=min(self._poll, remaining))
                reply = await self._script(backend, "poll", capacity, ticket)
                status = _text(reply[0])
                if status == "granted":
                    granted = True
                    return SlotLease(backend, ticket, time.monotonic() - started)
                if status == "gone":
                    # our ticket was dropped (we did not poll within the grace period,
                    # e.g. Redis was away): queue again, at the back of our tenant's tags
                    waiters.pop(ticket, None)
                    nonce = f"{self._unique}{next(self._sequence):x}"
                    again = await self._script(
                        backend, "acquire", capacity, nonce, tenant, repr(cost)
                    )
                    ticket = _text(again[1])
                    if _text(again[0]) == "granted":
                        granted = True
                        return SlotLease(backend, ticket, time.monotonic() - started)
                    position = int(again[3])
                    woken = loop.create_future()
                    waiters[ticket] = woken
                    continue
                position = int(reply[3])
                if woken.done():  # a wake for us that the poll then found taken back
                    woken = loop.create_future()
                    waiters[ticket] = woken
        finally:
            waiters.pop(ticket, None)
            if not waiters:
                self._waiters.pop(backend, None)
            if not granted:
                # timed out, the client left, or Redis failed: the place (or a slot
                # just handed to us) goes to the next in line
                with contextlib.suppress(SlotsUnavailable):
                    await asyncio.shield(self._script(backend, "release", capacity, ticket))

    def _ensure_waker(self, backend: str, last_wake: str) -> None:
        task = self._wakers.get(backend)
        if task is None or task.done():
            self._wakers[backend] = asyncio.ensure_future(self._wake_loop(backend, last_wake))

    async def _wake_loop(self, backend: str, last: str) -> None:
        """Read the backend's wake stream while this process has waiters for it."""
        stream = self._keys_of(backend).wake
        try:
            while not self._closed and self._waiters.get(backend):
                try:
                    reply = await self._redis.xread({stream: last}, count=128, block=self._block_ms)
                except (RedisError, OSError, TimeoutError):
                    await asyncio.sleep(self._poll)  # the waiters' polls carry on meanwhile
                    continue
                waiters = self._waiters.get(backend, {})
                early = self._early.setdefault(backend, {})
                for _, entries in _stream_entries(reply):
                    for entry_id, fields in entries:
                        last = _text(entry_id)
                        ticket = _text(fields.get(b"t", fields.get("t", b"")))
                        future = waiters.get(ticket)
                        if future is None:
                            early[ticket] = None  # maybe ours, its waiter not registered yet
                            if len(early) > _MAX_EARLY_WAKES:
                                del early[next(iter(early))]
                        elif not future.done():
                            future.set_result(None)
        finally:
            if self._wakers.get(backend) is asyncio.current_task():
                del self._wakers[backend]

    # Redis ---------------------------------------------------------------------------

    def _keys_of(self, backend: str) -> _Keys:
        keys = self._keys.get(backend)
        if keys is None:
            keys = self._keys[backend] = _Keys(self._prefix, backend)
        return keys

    async def _script(self, backend: str, mode: str, capacity: int, *extra: RedisArg) -> Any:
        now_ms = int(self._clock() * 1000)
        args: tuple[RedisArg, ...] = (mode, now_ms, capacity, self._ttl_ms, self._grace_ms, *extra)
        return await self._call(self._evalsha(self._keys_of(backend).keys, args))

    async def _execute(self, *args: RedisArg) -> Any:
        if self._pipelined is not None:
            return await self._pipelined.execute(*args)
        return await self._redis.execute_command(*args)

    async def _evalsha(self, keys: Sequence[RedisArg], args: Sequence[RedisArg]) -> Any:
        if self._pipelined is not None:
            return await self._pipelined.evalsha(_SHA, _TEXT, keys, args)
        run = self._redis.execute_command
        try:
            return await run("EVALSHA", _SHA, len(keys), *keys, *args)
        except NoScriptError:
            return await run("EVAL", _TEXT, len(keys), *keys, *args)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError:
            raise SlotsUnavailable("redis did not answer in time") from None
        except (RedisError, OSError) as exc:
            raise SlotsUnavailable(f"redis failed: {type(exc).__name__}: {exc}") from exc


def _stream_entries(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]:
    """``XREAD``'s reply as ``[(stream, [(id, fields)])]`` (``None`` when the block ran out)."""
    if not reply:
        return []
    return [(name, [(e[0], e[1]) for e in entries]) for name, entries in reply]
