"""Which models each backend has loaded, as this replica's own routing knows it. Pure.

SPEC section 12. Discovery polls ``/api/ps`` every few seconds, so its view of
a backend's loaded models can be a whole interval old: a backend that has
just been sent a request for another model (and so is evicting the one the
poll still shows) looks warm for that model until the next poll. A router
that trusts it sends requests to a model that is on its way out, and each
of them becomes a cold load.

:class:`Residency` corrects the poll with what this replica did itself: a
request routed to backend B for model M means M is (or is being) loaded on
B from that moment. A backend holds at most ``capacity`` models at once
(``OLLAMA_MAX_LOADED_MODELS``, or what its memory fits); the gateway is not
told that number, so it is learned as the most models a poll has shown
loaded there together, starting from 1 (the careful guess: a load evicts).
The effective view of B is then the ``capacity`` models most recently
routed there within ``horizon`` seconds (after that, the poll has caught up
with them), topped up with the polled ones.

:class:`Timings` keeps what a request costs on the fleet (a moving average
of the service time and of a cold load's duration, both from the answers'
final figures), so routing can weigh a short wait on a backend that has the
model loaded against a load elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DEFAULT_LOAD_SECONDS", "DEFAULT_SERVICE_SECONDS", "Residency", "Timings"]

#: What a cold load and one answer are assumed to take before any was seen.
DEFAULT_LOAD_SECONDS = 5.0
DEFAULT_SERVICE_SECONDS = 2.0
_ALPHA = 0.2  # weight of the newest observation in the moving averages


@dataclass(slots=True)
class _Backend:
    capacity: int = 1
    routed: dict[str, float] = field(default_factory=dict)  # model -> last routed at


class Residency:
    """The loaded models per backend: the poll, corrected by our own routing (module doc)."""

    def __init__(self, horizon_seconds: float) -> None:
        self._horizon = horizon_seconds
        self._backends: dict[str, _Backend] = {}

    def capacity(self, backend: str) -> int:
        """How many models ``backend`` has been seen to hold at once (at least 1)."""
        known = self._backends.get(backend)
        return known.capacity if known is not None else 1

    def polled(self, backend: str, loaded: frozenset[str]) -> None:
        """A poll's loaded set: it teaches how many models the backend holds together."""
        known = self._backends.setdefault(backend, _Backend())
        known.capacity = max(known.capacity, len(loaded))

    def routed(self, backend: str, model: str, now: float) -> None:
        """A request for ``model`` was sent to ``backend``: loaded there from now on."""
        known = self._backends.setdefault(backend, _Backend())
        known.routed[model] = now

    def refused(self, backend: str, model: str) -> None:
        """The request routed there never ran (unreachable, 5xx): it loaded nothing."""
        known = self._backends.get(backend)
        if known is not None:
            known.routed.pop(model, None)

    def recent(self, backend: str, now: float) -> frozenset[str]:
        """The models routed to ``backend`` within the horizon (in demand there lately)."""
        known = self._backends.get(backend)
        if known is None:
            return frozenset()
        return frozenset(m for m, at in known.routed.items() if now - at <= self._horizon)

    def loaded(self, backend: str, polled: frozenset[str], now: float) -> frozenset[str]:
        """The models ``backend`` has loaded (or is loading) now, as best known here."""
        known = self._backends.get(backend)
        if known is None:
            return polled
        for model in [m for m, at in known.routed.items() if now - at > self._horizon]:
            del known.routed[model]
        if not known.routed:
            return polled
        capacity = max(known.capacity, len(polled), 1)
        recent = sorted(known.routed, key=lambda m: -known.routed[m])[:capacity]
        rest = [m for m in sorted(polled) if m not in known.routed]
        return frozenset(recent + rest[: capacity - len(recent)])


@dataclass(slots=True)
class Timings:
    """Moving averages of a request's service time and of a cold load (seconds)."""

    service_seconds: float = DEFAULT_SERVICE_SECONDS
    load_seconds: float = DEFAULT_LOAD_SECONDS
    _services_seen: bool = False
    _loads_seen: bool = False

    def served(self, seconds: float) -> None:
        """An answer took ``seconds`` to generate (its load left out)."""
        if seconds <= 0:
            return
        self.service_seconds = _average(self.service_seconds, seconds, self._services_seen)
        self._services_seen = True

    def loaded(self, seconds: float) -> None:
        """A cold load took ``seconds``."""
        if seconds <= 0:
            return
        self.load_seconds = _average(self.load_seconds, seconds, self._loads_seen)
        self._loads_seen = True


def _average(current: float, new: float, seen: bool) -> float:
    return current + _ALPHA * (new - current) if seen else new
