"""``asyncio.timeout(seconds)`` for many tasks at once, with one timer between them.

``asyncio.timeout`` schedules a timer per use (a ``TimerHandle`` pushed on
the loop's heap, whose entries compare in Python) and cancels it on exit:
about 10 µs a use under load, several per cent of an ``/authorize``
decision. When every use lasts the same ``seconds``, deadlines fall in the
order the uses begin, so one timer, set for the oldest deadline of a use
still running, serves all of them. :class:`SharedTimeout` keeps its uses in
that order and, when the timer fires, cancels the tasks past their deadline
and sets itself for the next one; each use behaves as ``asyncio.timeout``'s
(Python 3.11): the task is cancelled at its deadline, the ``CancelledError``
leaves the block as ``TimeoutError``, and a cancellation from elsewhere
stays a cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import time
from types import TracebackType

__all__ = ["SharedTimeout"]

#: A loop runs a timer up to this early (``BaseEventLoop._clock_resolution``).
_RESOLUTION = time.get_clock_info("monotonic").resolution

_ENTERED, _EXPIRING, _EXPIRED, _EXITED = "entered", "expiring", "expired", "exited"


class SharedTimeout:
    """``async with shared():`` bounds the block by ``seconds``, as ``asyncio.timeout`` does.

    One instance per length of bound; its uses may run in any number of
    tasks of one event loop at a time (a new loop starts it afresh).
    """

    __slots__ = ("_loop", "_running", "_seconds", "_timer")

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("the timeout must be positive")
        self._seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        # uses in the order they began (= deadline order); left ones are dropped lazily
        self._running: collections.deque[_Bound] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> _Bound:
        return _Bound(self)

    def _enter(self, bound: _Bound) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the first use, or another loop (tests): start afresh
            self._loop, self._running, self._timer = loop, collections.deque(), None
        deadline = loop.time() + self._seconds
        self._running.append(bound)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)
        return deadline

    def _fire(self) -> None:
        self._timer = None
        loop, running = self._loop, self._running
        if loop is None:  # pragma: no cover - a timer exists only once a use entered
            return
        now = loop.time() + _RESOLUTION
        while running:
            head = running[0]
            if head.state is not _ENTERED:  # left its block already
                running.popleft()
            elif head.deadline <= now:
                running.popleft()
                head.expire()
            else:
                self._timer = loop.call_at(head.deadline, self._fire)
                return


class _Bound:
    """One use of a :class:`SharedTimeout` (``asyncio.Timeout``'s states and exit rule)."""

    __slots__ = ("_cancelling", "_shared", "_task", "deadline", "state")

    def __init__(self, shared: SharedTimeout) -> None:
        self._shared = shared
        self.state = ""
        self.deadline = 0.0

    async def __aenter__(self) -> _Bound:
        if self.state:
            raise RuntimeError("this timeout was entered already")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a timeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.state = _ENTERED
        self.deadline = self._shared._enter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.state is _EXPIRING:
            self.state = _EXPIRED
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                # no other cancellation is pending: this one was ours
                raise TimeoutError from exc
        else:
            self.state = _EXITED

    def expire(self) -> None:
        """The deadline passed while the block runs: cancel its task (the shared timer)."""
        self._task.cancel()
        self.state = _EXPIRING

    def expired(self) -> bool:
        """Whether the deadline passed while the block ran."""
        return self.state in (_EXPIRING, _EXPIRED)
