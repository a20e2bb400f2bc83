"""The active check of one backend: ``GET /api/tags`` and ``GET /api/ps``, bounded in time.

A backend is *reachable* when ``/api/tags`` answers 200 with a readable
model list; ``/api/ps`` only adds what is loaded (a failure there leaves
``loaded`` empty and says so in ``error``). Every failure becomes a status
with ``error`` set (``connect_error``, ``timeout``, ``status <n>``,
``bad_body``), never an exception, so one broken backend cannot stop the
round that checks the others.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import msgspec

from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.domain.models import canonical_model

__all__ = ["HttpBackendChecker"]


class _Models(msgspec.Struct):
    models: list[dict[str, Any]] = msgspec.field(default_factory=list)


_models_decoder = msgspec.json.Decoder(_Models)


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _canonical_names(entries: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for entry in entries:
        name = entry.get("name") or entry.get("model")
        canonical = canonical_model(name) if isinstance(name, str) else ""
        if canonical and canonical not in names:
            names.append(canonical)
    return names


class HttpBackendChecker:
    """Checks backends over one aiohttp session (:meth:`open` in the lifespan)."""

    def __init__(self, *, timeout_seconds: float = 2.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def check(self, spec: BackendSpec) -> BackendStatus:
        """The backend's status now (never raises for the backend's own failures)."""
        now = time.time()
        try:
            tags = await self._models(spec.url + "/api/tags")
        except _Failed as failed:
            return BackendStatus(
                name=spec.name, url=spec.url, checked_at=now, reachable=False, error=failed.reason
            )
        error = None
        try:
            loaded = _canonical_names(await self._models(spec.url + "/api/ps"))
        except _Failed as failed:
            loaded, error = [], f"ps: {failed.reason}"
        return BackendStatus(
            name=spec.name,
            url=spec.url,
            checked_at=now,
            reachable=True,
            installed=tuple(_canonical_names(tags)),
            loaded=tuple(loaded),
            tags=tuple(tags),
            error=error,
        )

    async def _models(self, url: str) -> list[dict[str, Any]]:
        if self._session is None:
            raise RuntimeError("HttpBackendChecker.open() was not called")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            raise _Failed("timeout") from None
        except aiohttp.ClientConnectionError:
            raise _Failed("connect_error") from None
        except aiohttp.ClientError as exc:
            raise _Failed(type(exc).__name__) from None
        if status != 200:
            raise _Failed(f"status {status}")
        try:
            return _models_decoder.decode(body).models
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise _Failed("bad_body") from None
