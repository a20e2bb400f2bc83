"""Which models Ollama has installed: ``/api/tags``, cached in Redis and in-process.

The Redis copy (``<prefix>:models``, ``discovery_ttl_seconds``) is shared by
all proxy replicas, so Ollama sees one ``/api/tags`` per TTL, not one per
request; a tiny in-process cache (about a second) keeps Redis off the hot
path. Refreshes are single-flight. A failed discovery is not cached in
Redis and denies (:class:`DiscoveryFailed`, fail closed); an empty one
denies every model by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.exceptions import RedisError

from neuronetz_gateway.adapters.ollama_client import OllamaClient, UpstreamError
from neuronetz_gateway.domain.models import canonical_model, effective_models
from neuronetz_gateway.domain.openai_compat import OllamaModelEntry
from neuronetz_gateway.logging import get_logger

__all__ = ["Catalogue", "DiscoveryFailed", "ModelDiscovery"]

log = get_logger(__name__)


class DiscoveryFailed(Exception):
    """Ollama's model list could not be read: deny (fail closed)."""


class _Tags(msgspec.Struct):
    models: list[dict[str, Any]] = msgspec.field(default_factory=list)


_tags_decoder = msgspec.json.Decoder(_Tags)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The installed models: raw ``/api/tags`` entries by canonical name."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_tags(cls, body: bytes) -> Catalogue:
        """Parse an ``/api/tags`` body (entries without a usable name are dropped)."""
        entries: dict[str, dict[str, Any]] = {}
        for entry in _tags_decoder.decode(body).models:
            name = entry.get("name") or entry.get("model")
            canonical = canonical_model(name) if isinstance(name, str) else ""
            if canonical:
                entries.setdefault(canonical, entry)
        return cls(entries)

    def effective(self, allowed: list[str] | None) -> frozenset[str]:
        """Installed ∩ allowed (canonical names; ``None`` = every installed model)."""
        return effective_models(allowed, self.entries)

    def openai_entry(self, canonical: str) -> OllamaModelEntry:
        """One entry in the shape the OpenAI translators take."""
        raw = self.entries[canonical]
        name = str(raw.get("name") or raw.get("model") or canonical)
        return OllamaModelEntry(
            name=name,
            model=str(raw.get("model", name)),
            modified_at=str(raw.get("modified_at", "")),
        )


class ModelDiscovery:
    """The installed-model catalogue, cached (Redis shared, process-local briefly)."""

    def __init__(
        self,
        ollama: OllamaClient,
        redis: Any,
        *,
        redis_key: str,
        ttl_seconds: float,
        local_ttl_seconds: float = 1.0,
        fetch_timeout_seconds: float = 10.0,
    ) -> None:
        self._ollama = ollama
        self._redis = redis
        self._key = redis_key
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._local_ttl = min(local_ttl_seconds, ttl_seconds)
        self._fetch_timeout = fetch_timeout_seconds
        self._cached: Catalogue | None = None
        self._cached_until = 0.0
        self._lock = asyncio.Lock()

    async def catalogue(self) -> Catalogue:
        """The current catalogue; :class:`DiscoveryFailed` when Ollama cannot tell."""
        cached = self._cached
        if cached is not None and time.monotonic() < self._cached_until:
            return cached
        async with self._lock:
            if self._cached is not None and time.monotonic() < self._cached_until:
                return self._cached
            body = await self._from_redis()
            if body is None:
                body = await self._from_ollama()
            try:
                catalogue = Catalogue.from_tags(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise DiscoveryFailed("ollama sent an unreadable model list") from None
            self._cached = catalogue
            self._cached_until = time.monotonic() + self._local_ttl
            return catalogue

    def forget(self) -> None:
        """Drop the in-process copy (tests, or after Ollama said a model is missing)."""
        self._cached = None

    async def _from_redis(self) -> bytes | None:
        try:
            value = await self._redis.get(self._key)
        except (RedisError, OSError, TimeoutError):
            return None  # a cache, not a dependency: ask Ollama instead
        return bytes(value) if value is not None else None

    async def _from_ollama(self) -> bytes:
        try:
            status, body = await self._ollama.fetch(
                "GET", "/api/tags", limit_seconds=self._fetch_timeout
            )
        except UpstreamError as exc:
            log.warning("model_discovery_failed", reason=str(exc))
            raise DiscoveryFailed(str(exc)) from None
        if status != 200:
            log.warning("model_discovery_failed", status=status)
            raise DiscoveryFailed(f"ollama answered {status} to /api/tags")
        # Not cached: the next request asks Ollama again; correctness is unaffected.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._redis.set(self._key, body, px=self._ttl_ms)
        return body
