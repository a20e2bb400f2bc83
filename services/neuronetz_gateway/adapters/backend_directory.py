"""Which backends this proxy process routes to: the ``backend`` rows, live within a second.

:class:`BackendDirectory` loads the rows at start, LISTENs on
``nz_backend_events`` (one notification per changed row, migration m0007)
through the same self-healing listener the key revocation uses
(:class:`~neuronetz_gateway.auth.revocation.KeyEventListener`: pings,
reconnects, and reloads after a gap, when notifications may have been
lost), and reloads on every notification; reloads are coalesced, so a burst
of changes is one or two queries.

With no row, the one backend is ``NZ_OLLAMA_URL`` with ``NZ_OLLAMA_SLOTS``
(named ``default``): today's single-upstream behaviour. Until the first
load succeeds (Postgres down at start) that is the answer too, with a
warning; after one has succeeded, a failed reload keeps the last list, since
an outage of Postgres must not empty the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from neuronetz_gateway.auth.revocation import KeyEventListener
from neuronetz_gateway.domain.backends import DEFAULT_BACKEND, BackendSpec
from neuronetz_gateway.logging import get_logger

__all__ = ["BACKEND_CHANNEL", "BackendDirectory", "environment_backend"]

BACKEND_CHANNEL = "nz_backend_events"
APPLICATION_NAME = "nz-proxy-backend-listener"

log = get_logger(__name__)

LoadBackends = Callable[[], Awaitable[Sequence[BackendSpec]]]


def environment_backend(ollama_url: str, ollama_slots: int) -> BackendSpec:
    """``NZ_OLLAMA_URL`` as the one backend (when the operator defined none)."""
    return BackendSpec(DEFAULT_BACKEND, ollama_url.rstrip("/"), ollama_slots)


class _Gauge:
    def set(self, value: float) -> None:
        del value


class _Histogram:
    def observe(self, amount: float) -> None:
        del amount


class _ListenerMetrics:
    """The listener's metrics are not exported for the directory yet (the key listener's are)."""

    listener_up = _Gauge()
    revocation_lag_seconds = _Histogram()

    def key_event(self, kind: str) -> None:
        del kind


class BackendDirectory:
    """The current backends (:attr:`backends`), reloaded whenever a row changes."""

    def __init__(
        self,
        load: LoadBackends,
        fallback: BackendSpec,
        *,
        database_url: str | None = None,
        ping_interval: float = 1.0,
    ) -> None:
        self._load = load
        self._fallback = fallback
        self._rows: tuple[BackendSpec, ...] | None = None  # None: never loaded
        self._listener = (
            KeyEventListener(
                database_url,
                on_event=lambda _kind, _ident: None,
                on_event_async=self._on_event,
                on_gap=self.reload,
                on_state=lambda _up: None,
                metrics=_ListenerMetrics(),
                application_name=APPLICATION_NAME,
                channel=BACKEND_CHANNEL,
                ping_interval=ping_interval,
            )
            if database_url is not None
            else None
        )
        self._reloading: asyncio.Task[None] | None = None
        self._again = False
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[tuple[BackendSpec, ...]], None]] = []
        self.version = 0

    @property
    def backends(self) -> tuple[BackendSpec, ...]:
        """The operator's backends, or the environment's one when there are none."""
        return self._rows or (self._fallback,)

    @property
    def from_database(self) -> bool:
        """Whether the backends are the operator's rows (not the ``NZ_OLLAMA_URL`` fallback)."""
        return bool(self._rows)

    def on_change(self, callback: Callable[[tuple[BackendSpec, ...]], None]) -> None:
        """Call ``callback(backends)`` after every change (discovery follows the directory)."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Load once (a failure is logged: the fallback serves) and start listening."""
        await self.reload()
        if self._listener is not None:
            await self._listener.start()

    async def wait_listening(self, within: float) -> bool:
        """Whether the LISTEN connection is up within ``within`` seconds (tests, start-up)."""
        return self._listener is not None and await self._listener.wait_listening(within)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
        if self._reloading is not None:
            self._reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloading

    async def wait_for_change(self, after_version: int, within: float) -> bool:
        """Wait until :attr:`version` passes ``after_version``; ``False`` after ``within`` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.version <= after_version:
                    self._changed.clear()
                    await self._changed.wait()
        return self.version > after_version

    async def reload(self) -> None:
        """Load the rows now (single-flight: a reload asked for during one runs once after it)."""
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            await asyncio.shield(self._reloading)
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_until_settled())
        await asyncio.shield(self._reloading)

    async def _on_event(self, _kind: str, _ident: str) -> None:
        await self.reload()

    async def _reload_until_settled(self) -> None:
        while True:
            self._again = False
            await self._load_once()
            if not self._again:
                return

    async def _load_once(self) -> None:
        try:
            rows = tuple(await self._load())
        except Exception as exc:  # noqa: BLE001 - Postgres away: keep what we have
            if self._rows is None:
                log.warning(
                    "backend_directory_unavailable",
                    error=type(exc).__name__,
                    serving=self._fallback.url,
                )
            else:
                log.warning("backend_reload_failed", error=type(exc).__name__)
            return
        if rows == self._rows:
            return
        before = self.backends
        self._rows = rows
        if self.backends != before:
            log.info("backends_changed", backends=[b.name for b in self.backends])
            for callback in self._listeners:
                callback(self.backends)
        self.version += 1
        self._changed.set()
