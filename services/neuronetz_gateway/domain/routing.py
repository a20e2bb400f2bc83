"""Which backend of a fleet serves a request for model M, and where it fails over. Pure.

SPEC section 12. Among the backends that are healthy, active (not drained)
and have M installed, candidates are ranked in tiers:

1. *warm*: M is loaded and a slot is free (no load, no queue);
2. *the cheaper of a load and a wait*: a backend where M is loaded but every
   slot is taken (its expected wait: the requests ahead per slot times one
   service time), and a free backend where M is not loaded but loading it
   evicts nothing in use (nothing held there, or room for another model; the
   cost: one load, two when it evicts the last loaded copy of a model sent
   there lately, whose next request must then load it again). A wait no
   longer than that goes first; a tie, warm;
3. *cold on a busy backend*: loading M there would evict a model that has
   requests in flight or queued (Ollama lets those finish first, so the load
   waits for them, and every request for the evicted model then loads it
   again): only when M is loaded nowhere it could wait; first where the
   evicted model is loaded elsewhere too, then the least held.

So M is never sent to a backend that must load it while another has it
loaded with a free slot, nor to one that must evict a busy model while M
can wait somewhere it is loaded. Within tier 1 and among the loads of tier 2,
a request with a session key goes by rendezvous (highest-random-weight)
hashing on that key: the same session lands on the same backend whenever
that backend is in the best tier, so Ollama's KV cache for the conversation
is reused; adding or removing a backend moves only the sessions that hashed
to it. Without a session key the backend with the most free slots (times
its weight) comes first.

The route is the ordered candidate list: the pool takes the first that has a
slot free at once, up to :attr:`Route.wait_at` (the warm backend worth
waiting for), and else waits at that one (or the first); on a failure before
the first byte it retries once on another candidate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from neuronetz_gateway.domain.models import canonical_model

__all__ = [
    "BackendView",
    "Costs",
    "Route",
    "plan_route",
    "rendezvous_order",
]


@dataclass(frozen=True, slots=True)
class BackendView:
    """What routing needs to know of one backend at this moment.

    ``installed`` / ``loaded`` hold canonical model names (``/api/tags`` and
    ``/api/ps``, the latter corrected by our own routing); ``busy`` is the
    slots held now, ``queued`` the requests waiting for one (both from the
    slot admission in Redis); ``models`` how many models it holds loaded at
    once (what a load beyond that evicts); ``recent`` the models sent to it
    lately (in demand there).
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
    models: int = 1
    recent: frozenset[str] = field(default_factory=frozenset)

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
    wait_at: str | None = None  # the warm backend to queue at rather than try those after it

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


@dataclass(frozen=True, slots=True)
class Costs:
    """What a request costs the fleet, in seconds (learned from answers by the pool)."""

    service_seconds: float = 2.0  # one answer's generation
    load_seconds: float = 5.0  # one cold load


def _evicts_nothing_busy(backend: BackendView) -> bool:
    """A load here would not push out a model that has requests held or queued."""
    idle = backend.busy == 0 and backend.queued == 0
    return idle or _has_room(backend)


def _has_room(backend: BackendView) -> bool:
    return len(backend.loaded) < backend.models


def _evicts_last_copy(
    backend: BackendView, usable: Sequence[BackendView], *, sent_lately: bool
) -> bool:
    """A load on ``backend`` pushes out the only loaded copy (among ``usable``) of one of
    its models; with ``sent_lately``, only of one sent there lately counts."""
    if _has_room(backend):
        return False
    return any(
        (m in backend.recent or not sent_lately)
        and not any(m in other.loaded for other in usable if other.name != backend.name)
        for m in backend.loaded
    )


def _expected_wait(backend: BackendView, costs: Costs) -> float:
    """Roughly how long the next request waits for a slot on ``backend`` (every slot held)."""
    ahead = backend.queued + 1
    return ahead / (backend.slots * max(backend.weight, 1)) * costs.service_seconds


def plan_route(
    model: str,
    backends: Iterable[BackendView],
    session: str | None = None,
    costs: Costs | None = None,
) -> Route:
    """Rank the backends that can serve ``model`` now (see the module docstring)."""
    wanted = canonical_model(model)
    costs = costs or Costs()
    usable = [b for b in backends if b.healthy and b.active]
    able = [b for b in usable if b.slots > 0 and wanted and wanted in b.installed]
    if not able:
        return Route(wanted, ())
    hrw: Mapping[str, int] = {}
    if session is not None:
        order = rendezvous_order(session, ((b.name, b.weight) for b in able))
        hrw = {name: i for i, name in enumerate(order)}

    def within(b: BackendView) -> float:
        return float(hrw[b.name]) if hrw else -float(b.free * max(b.weight, 1))

    def rank(b: BackendView) -> tuple[float, ...]:
        warm = wanted in b.loaded
        if warm and b.free > 0:
            return (0, within(b))
        if warm:  # every slot held: a wait
            return (1, _expected_wait(b, costs), 0.0, float(hrw.get(b.name, 0)))
        if b.free > 0 and _evicts_nothing_busy(b):
            loads = 2 if _evicts_last_copy(b, usable, sent_lately=True) else 1
            return (1, loads * costs.load_seconds, 1.0, within(b))
        # a load that waits for (and then evicts) a model in use: one loaded elsewhere
        # too first, then the least held
        last = 1.0 if _evicts_last_copy(b, usable, sent_lately=False) else 0.0
        per_slot = (b.busy + b.queued + 1) / (b.slots * max(b.weight, 1))
        return (2, last, per_slot, float(hrw.get(b.name, 0)))

    ranked = sorted(able, key=lambda b: (rank(b), b.name))
    wait_at = next(
        (b.name for b in ranked if wanted in b.loaded and b.free == 0),
        None,
    )
    return Route(wanted, tuple(b.name for b in ranked), sticky=bool(hrw), wait_at=wait_at)
