"""A circuit breaker per backend: closed, open, half-open; fed by checks and by requests.

::

    closed --(failure_threshold failures in a row)--> open
    open --(open_seconds passed)--> half-open
    half-open --(a trial succeeds)--> closed
    half-open --(a trial fails)--> open (again for open_seconds)

Both the active health checks (``/api/tags``, ``/api/ps`` every few seconds)
and the passive outcomes of real requests (a connect error, a 5xx, a
timeout) are :class:`Outcome` values given to :meth:`CircuitBreaker.record`.
While open the backend gets no request; half-open lets ``trial_requests``
through (a trial that never reports, because its client left, frees its
place again after ``open_seconds``), and an active check counts as a trial
too, so an idle backend closes again without traffic.

Pure: time is a ``now`` argument (seconds, any monotonic origin).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BreakerPolicy", "BreakerSnapshot", "CircuitBreaker", "CircuitState", "Outcome"]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    """What one call to a backend (a request or a check) came to."""

    SUCCESS = "success"
    CONNECT_ERROR = "connect_error"
    SERVER_ERROR = "server_error"  # a 5xx
    TIMEOUT = "timeout"

    @classmethod
    def of_status(cls, status: int) -> Outcome:
        """A response's outcome: a 5xx is the backend's failure; anything else is not."""
        return cls.SERVER_ERROR if status >= 500 else cls.SUCCESS


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When to open and how long to stay open."""

    failure_threshold: int = 3
    open_seconds: float = 5.0
    trial_requests: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.trial_requests < 1 or self.open_seconds <= 0:
            raise ValueError("failure_threshold and trial_requests >= 1, open_seconds > 0")


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The breaker as listings and metrics show it."""

    state: CircuitState
    consecutive_failures: int
    opened_at: float | None


class CircuitBreaker:
    """One backend's breaker (see the module docstring)."""

    __slots__ = ("_failures", "_opened_at", "_policy", "_trials")

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self._policy = policy or BreakerPolicy()
        self._failures = 0
        self._opened_at: float | None = None
        self._trials: list[float] = []  # when each half-open trial went out

    def state(self, now: float) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if now - self._opened_at < self._policy.open_seconds:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def available(self, now: float) -> bool:
        """Whether a request may be sent now, without taking a trial (for routing)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        return len(self._live_trials(now)) < self._policy.trial_requests

    def allow(self, now: float) -> bool:
        """Whether a request may be sent now; in half-open it takes one of the trials."""
        if not self.available(now):
            return False
        if self.state(now) is CircuitState.HALF_OPEN:
            self._trials = [*self._live_trials(now), now]
        return True

    def record(self, outcome: Outcome, now: float) -> CircuitState:
        """Count one outcome; returns the state after it."""
        state = self.state(now)
        if outcome is Outcome.SUCCESS:
            if state is CircuitState.HALF_OPEN:
                self._close()
            elif state is CircuitState.CLOSED:
                self._failures = 0
            # open: a late answer to a request sent before it opened proves nothing new
        elif state is CircuitState.HALF_OPEN:
            self._open(now)
        elif state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self._policy.failure_threshold:
                self._open(now)
        return self.state(now)

    def snapshot(self, now: float) -> BreakerSnapshot:
        return BreakerSnapshot(self.state(now), self._failures, self._opened_at)

    def _live_trials(self, now: float) -> list[float]:
        return [t for t in self._trials if now - t < self._policy.open_seconds]

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._trials = []

    def _close(self) -> None:
        self._opened_at = None
        self._failures = 0
        self._trials = []
