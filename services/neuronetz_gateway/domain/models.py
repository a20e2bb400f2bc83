"""Model names canonicalised as Ollama does, and the effective model set. Pure.

``llama3.2`` = ``llama3.2:latest`` = ``library/llama3.2`` =
``registry.ollama.ai/library/llama3.2:latest`` (case-insensitive). The
canonical form is the short one Ollama lists: ``name:tag`` for the default
registry and namespace, ``namespace/name:tag`` or ``host/ns/name:tag``
otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

__all__ = ["canonical_model", "effective_models"]

_DEFAULT_REGISTRY = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
#: Names up to this long are remembered (the request body names the model once per
#: request); longer ones, never a real model, are canonicalised each time.
_CACHED_NAME_CHARS = 200


def canonical_model(name: str) -> str:
    """The canonical spelling of a model reference; ``""`` if it is not one.

    Remembered for the last 1024 short names (a client's model names do not change).
    """
    if len(name) <= _CACHED_NAME_CHARS:
        return _canonical_cached(name)
    return _canonical(name)


def _canonical(name: str) -> str:
    ref = name.strip().lower()
    if not ref or any(c.isspace() for c in ref) or "@" in ref:
        return ""
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        ref += ":latest"
    parts = ref.split("/")
    if len(parts) == 3 and parts[0] == _DEFAULT_REGISTRY:
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == _DEFAULT_NAMESPACE:
        parts = parts[1:]
    if any(not p for p in parts) or len(parts) > 3:
        return ""
    return "/".join(parts)


_canonical_cached = lru_cache(maxsize=1024)(_canonical)


def effective_models(allowed: Iterable[str] | None, discovered: Iterable[str]) -> frozenset[str]:
    """Allowed ∩ discovered, canonical; ``allowed=None`` means every discovered model."""
    found = {c for c in (canonical_model(m) for m in discovered) if c}
    if allowed is None:
        return frozenset(found)
    return frozenset(found & {c for c in (canonical_model(m) for m in allowed) if c})
