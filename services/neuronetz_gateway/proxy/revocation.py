"""Ending a revoked key's running requests, on every proxy replica, within a second.

Each proxy process keeps its running exchanges by key
(:class:`~neuronetz_gateway.proxy.running.RunningRequests`)
and LISTENs on ``nz_key_events`` with the auth's
:class:`~neuronetz_gateway.auth.revocation.KeyEventListener`. A notification
says only that a key or tenant row changed (``set-limits`` sends one too),
so when one concerns a running request the proxy asks Postgres which of
those keys are revoked and ends exactly their requests
(:meth:`Exchange.revoke`: the upstream connection is closed, so Ollama stops
generating, the client gets the surface's mid-stream error, the tokens so far
are charged and the audit row says ``revoked``). After a gap in the LISTEN
connection, notifications may have been lost: every running key is checked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from neuronetz_gateway.auth.revocation import KeyEventListener
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.metrics import ProxyMetrics
from neuronetz_gateway.proxy.running import RunningRequests

__all__ = ["RevocationWatch"]

log = get_logger(__name__)

APPLICATION_NAME = "nz-proxy-key-listener"


class RevocationWatch:
    """LISTEN for key events; end the running requests of keys that are now revoked."""

    def __init__(
        self,
        database_url: str,
        running: RunningRequests,
        revoked_keys: Callable[[list[int]], Awaitable[set[int]]],
        metrics: ProxyMetrics,
    ) -> None:
        self._running = running
        self._revoked_keys = revoked_keys
        self._metrics = metrics
        self.listener = KeyEventListener(
            database_url,
            on_event=lambda _kind, _ident: None,
            on_event_async=self._on_event,
            on_gap=self._on_gap,
            on_state=lambda _up: None,
            metrics=metrics,
            application_name=APPLICATION_NAME,
        )

    async def start(self) -> None:
        """Start listening in the background."""
        await self.listener.start()

    async def stop(self) -> None:
        """Stop listening."""
        await self.listener.stop()

    async def _on_event(self, kind: str, ident: str) -> None:
        await self._check(self._running.key_ids(kind, ident))

    async def _on_gap(self) -> None:
        await self._check(self._running.key_ids("unknown", ""))

    async def _check(self, key_ids: list[int]) -> None:
        if not key_ids:
            return  # nothing of that key runs here: no query
        try:
            revoked = await self._revoked_keys(key_ids)
        except Exception as exc:  # noqa: BLE001 - Postgres away: the next event or gap retries
            log.warning("revocation_check_failed", error=type(exc).__name__)
            return
        for key_id in revoked:
            ended = self._running.end(key_id)
            if ended:
                self._metrics.revoked_requests.inc(ended)
                log.info("revoked_requests_ended", key_id=key_id, requests=ended)
