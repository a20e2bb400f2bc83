"""Revocation in under a second: LISTEN on ``nz_key_events`` and evict on every notify.

Triggers on ``api_key`` and ``tenant`` (migration m0002) send ``key:<prefix>``
or ``tenant:<id>``. The listener holds its own connection (not a pool one),
pings through the same channel every ``ping_interval`` seconds (which both
proves the connection alive and measures the notification lag), and on any
sign of a gap (the server closed it, a ping failed or timed out):

1. stops vouching for the in-process cache (``on_state(False)``),
2. reconnects with backoff and LISTENs again,
3. flushes every cache (``on_gap``): notifications sent during the gap are
   lost, so nothing cached before it is trusted,
4. vouches again (``on_state(True)``).

The proxy runs one too (:mod:`neuronetz_gateway.proxy.revocation`), to end
a revoked key's running streams; both pass their own metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import asyncpg

from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.stopping import stop_task, wait_set

__all__ = ["CHANNEL", "KeyEventListener", "ListenerMetrics"]

CHANNEL = "nz_key_events"
APPLICATION_NAME = "nz-auth-key-listener"
_PING = "ping:"

log = get_logger(__name__)


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class ListenerMetrics(Protocol):
    """What the listener counts (the auth's and the proxy's metrics both have it)."""

    @property
    def listener_up(self) -> _Gauge: ...

    @property
    def revocation_lag_seconds(self) -> _Histogram: ...

    def key_event(self, kind: str) -> None: ...


class KeyEventListener:
    """Keeps one LISTEN connection alive and turns notifications into evictions."""

    def __init__(
        self,
        database_url: str,
        *,
        on_event: Callable[[str, str], None],
        on_event_async: Callable[[str, str], Coroutine[Any, Any, None]],
        on_gap: Callable[[], Awaitable[None]],
        on_state: Callable[[bool], None],
        metrics: ListenerMetrics,
        application_name: str = APPLICATION_NAME,
        channel: str = CHANNEL,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        max_backoff: float = 2.0,
    ) -> None:
        self._dsn = database_url
        self._on_event = on_event
        self._on_event_async = on_event_async
        self._on_gap = on_gap
        self._on_state = on_state
        self._metrics = metrics
        self._application_name = application_name
        self._channel = channel  # the backend directory listens on nz_backend_events
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_backoff = max_backoff
        self._token = secrets.token_hex(6)  # tells our pings from other replicas'
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._pending: set[asyncio.Task[None]] = set()
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self.listening = False

    async def start(self) -> None:
        """Start listening in the background (returns at once; see :attr:`listening`)."""
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nz-key-listener")

    async def wait_listening(self, within: float) -> bool:
        """Wait until the listener is up (tests and start-up); ``False`` if not ``within`` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._up.wait()
        return self.listening

    async def stop(self) -> None:
        """Stop listening and wait for pending evictions.

        The loops end by the flag too, and the wait is bounded (a cancellation
        swallowed mid-command or by ``wait_for`` must not hang a shutdown).
        """
        if self._task is not None:
            task, self._task = self._task, None
            self._stopping = True
            self._lost.set()  # the ping loop returns at once
            await stop_task(task, within=self._ping_timeout * 2 + 2.0)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _set_state(self, listening: bool) -> None:
        self.listening = listening
        if listening:
            self._up.set()
        else:
            self._up.clear()
        self._metrics.listener_up.set(1 if listening else 0)
        self._on_state(listening)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            conn: asyncpg.Connection | None = None
            try:
                conn = connected = await asyncio.wait_for(
                    asyncpg.connect(
                        self._dsn, server_settings={"application_name": self._application_name}
                    ),
                    timeout=self._ping_timeout * 2,
                )
                self._lost.clear()
                connected.add_termination_listener(self._terminated)
                await connected.add_listener(self._channel, self._notified)
                await self._on_gap()  # events during the gap are lost: trust nothing older
                self._set_state(True)
                log.info("key_listener_up")
                backoff = 0.05
                if self._stopping:
                    return
                await self._watch(connected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is a gap; we reconnect
                log.warning("key_listener_down", error=type(exc).__name__)
            finally:
                if self.listening:
                    self._set_state(False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(self._max_backoff, backoff * 2)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Ping until the connection is lost (returns or raises then)."""
        while not self._stopping and not self._lost.is_set() and not conn.is_closed():
            if await wait_set(self._lost, self._ping_interval) or self._stopping:
                return
            payload = f"{_PING}{self._token}:{time.monotonic():.6f}"
            await asyncio.wait_for(
                conn.execute("SELECT pg_notify($1, $2)", self._channel, payload),
                timeout=self._ping_timeout,
            )

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        if kind == "ping":
            token, _, sent = ident.partition(":")
            if token == self._token:
                with contextlib.suppress(ValueError):
                    self._metrics.revocation_lag_seconds.observe(time.monotonic() - float(sent))
            return
        if kind not in ("key", "tenant"):
            kind = "unknown"  # evict everything rather than guess
        self._metrics.key_event(kind)
        self._on_event(kind, ident)  # in-process: at once, before anything else runs
        task = asyncio.get_running_loop().create_task(self._on_event_async(kind, ident))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
