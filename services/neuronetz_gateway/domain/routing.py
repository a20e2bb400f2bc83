"""Which backend of a fleet serves a request for model M, and where it fails over. Pure.

SPEC section 12. Among the backends that are healthy, active (not drained)
and have M installed, candidates are ranked in tiers:

1. *warm*: M is loaded and a slot is free (no load, no queue);
2. *cold*: a slot is free but M must be loaded first;
3. *busy*: no slot is free; the shortest queue (per slot) first, M loaded
   breaking ties.

So M is never sent to a backend that must load it while another has it
loaded with a free slot. Within a tier, a request with a session key goes by
rendezvous (highest-random-weight) hashing on that key: the same session
lands on the same backend whenever that backend is in the best tier, so
Ollama's KV cache for the conversation is reused; adding or removing a
backend moves only the sessions that hashed to it. Without a session key
the backend with the most free slots (times its weight) comes first.

The route is the ordered candidate list: the pool forwards to the first and,
on a failure before the first byte, retries once on the second.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from neuronetz_gateway.domain.models import canonical_model

__all__ = [
    "BackendView",
    "Route",
    "plan_route",
    "rendezvous_order",
]


@dataclass(frozen=True, slots=True)
class BackendView:
    """What routing needs to know of one backend at this moment.

    ``installed`` / ``loaded`` hold canonical model names (``/api/tags`` and
    ``/api/ps``); ``busy`` is the slots held now, ``queued`` the requests
    waiting for one (both from the slot admission in Redis).
    """

    name: str
    slots: int
    installed: frozenset[str] = field(default_factory=frozenset)
    loaded: frozenset[str] = field(default_factory=frozenset)
    busy: int = 0
    queued: int = 0
    healthy: bool = True
    active: bool = True  # False: drained by the operator, takes no new request
    weight: int = 1

    @property
    def free(self) -> int:
        """Slots free now (never negative)."""
        return max(self.slots - self.busy, 0)


@dataclass(frozen=True, slots=True)
class Route:
    """The ranked candidates for one request (empty: no backend can serve the model)."""

    model: str
    candidates: tuple[str, ...]
    sticky: bool = False  # ranked by the session key

    @property
    def first(self) -> str | None:
        """The backend to forward to, if any."""
        return self.candidates[0] if self.candidates else None

    def failover(self, failed: str) -> str | None:
        """The one other candidate to retry on after ``failed`` failed before the first byte."""
        for name in self.candidates:
            if name != failed:
                return name
        return None


def _hrw_score(key: str, backend: str, weight: int) -> float:
    """Weighted rendezvous score: ``-w / ln(u)`` for a uniform ``u`` in (0, 1) from the hash."""
    digest = hashlib.blake2b(f"{key}\x00{backend}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -max(weight, 1) / math.log(u)


def rendezvous_order(key: str, backends: Iterable[tuple[str, int]]) -> list[str]:
    """Backend names ``(name, weight)`` ordered by their rendezvous score for ``key``."""
    scored = [(-_hrw_score(key, name, weight), name) for name, weight in backends]
    return [name for _, name in sorted(scored)]


def _tier(backend: BackendView, model: str) -> int:
    if backend.free > 0:
        return 0 if model in backend.loaded else 1
    return 2


def plan_route(model: str, backends: Iterable[BackendView], session: str | None = None) -> Route:
    """Rank the backends that can serve ``model`` now (see the module docstring)."""
    wanted = canonical_model(model)
    able = [
        b
        for b in backends
        if b.healthy and b.active and b.slots > 0 and wanted and wanted in b.installed
    ]
    if not able:
        return Route(wanted, ())
    hrw: Mapping[str, int] = {}
    if session is not None:
        order = rendezvous_order(session, ((b.name, b.weight) for b in able))
        hrw = {name: i for i, name in enumerate(order)}

    def rank(b: BackendView) -> tuple[float, ...]:
        tier = _tier(b, wanted)
        if tier < 2:
            within = float(hrw[b.name]) if hrw else -float(b.free * max(b.weight, 1))
            return (tier, within)
        # no free slot anywhere in this tier: the shortest queue per slot, then M loaded
        per_slot = (b.queued + 1) / (b.slots * max(b.weight, 1))
        warm = 0.0 if wanted in b.loaded else 1.0
        return (tier, per_slot, warm, float(hrw[b.name]) if hrw else 0.0)

    ranked = sorted(able, key=lambda b: (rank(b), b.name))
    return Route(wanted, tuple(b.name for b in ranked), sticky=bool(hrw))
