"""Traffic through Caddy while a dependency fails, and the figures of what it cost.

:class:`Traffic` runs a few concurrent clients (bounded: 127.0.0.1, 4 at a
time) and records every answer with its start and end time; :func:`figures`
turns the record and a fault window into the numbers the chaos tests check
and print (issue 13): unchecked 200s, 503s and how long they lasted, answers
refused after recovery, audit rows lost and leases still held after their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

__all__ = ["Answer", "Figures", "Traffic", "figures"]

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: the connection broke (no status, or a stream cut short)
    complete: bool  # a 200 whose body (stream included) arrived whole
    request_id: str = ""


@dataclass
class Traffic:
    """``workers`` clients sending chats through Caddy until :meth:`stop`."""

    url: str
    key: str
    workers: int = 4
    stream: bool = False
    answers: list[Answer] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=self.workers))
        self._client = client
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def _worker(self) -> None:
        body = {**CHAT, "stream": self.stream}
        headers = {"authorization": f"Bearer {self.key}"}
        while not self._stopping.is_set():
            started = time.monotonic()
            status, complete, request_id = 0, False, ""
            try:
                async with self._client.stream(
                    "POST", f"{self.url}/api/chat", json=body, headers=headers
                ) as reply:
                    status = reply.status_code
                    request_id = reply.headers.get("x-request-id", "")
                    text = (await reply.aread()).decode(errors="replace")
                    complete = status == 200 and '"done":true' in text.replace(" ", "")
            except httpx.HTTPError:
                pass
            self.answers.append(Answer(started, time.monotonic(), status, complete, request_id))
            if status != 200:
                await asyncio.sleep(0.05)  # a refused client backs off a little

    async def first_success_after(self, moment: float, within: float = 30.0) -> float:
        """The end time of the first complete 200 that started after ``moment``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for answer in self.answers:
                if answer.started > moment and answer.complete:
                    return answer.ended
            await asyncio.sleep(0.05)
        raise AssertionError("no request succeeded after the fault")

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()


@dataclass(frozen=True)
class Figures:
    requests: int
    ok: int
    unchecked_200: int
    unavailable_503: int
    unavailable_seconds: float
    refused_after_recovery: int
    broken: int  # connections cut (a SIGKILLed proxy's streams)
    audit_rows_lost: int
    leases_leaked: int
    server_errors: int = 0  # every 5xx (503s included)
    server_error_seconds: float = 0.0  # from the first 5xx's start to the last one's end
    budget_minus_ledger_tokens: int = 0  # the tenant's daily counter minus its ledger
    reservations_held_tokens: int = 0  # of it, reservations unsettled within their TTL
    statuses: str = ""  # every status seen and how often (0: the connection broke)

    def line(self, name: str) -> str:
        return (
            f"CHAOS {name}: requests={self.requests} ok={self.ok} "
            f"unchecked_200={self.unchecked_200} 503s={self.unavailable_503} "
            f"over {self.unavailable_seconds:.2f}s refused_after_recovery="
            f"{self.refused_after_recovery} broken={self.broken} "
            f"audit_rows_lost={self.audit_rows_lost} leases_leaked={self.leases_leaked} "
            f"5xx={self.server_errors} over {self.server_error_seconds:.2f}s "
            f"budget_minus_ledger_tokens={self.budget_minus_ledger_tokens} "
            f"reservations_held_tokens={self.reservations_held_tokens} "
            f"statuses={self.statuses}"
        )


def figures(
    answers: list[Answer],
    *,
    down: tuple[float, float] | None,
    recovered: float,
    audited: set[str],
    leases_leaked: int,
    budget_minus_ledger_tokens: int = 0,
    reservations_held_tokens: int = 0,
) -> Figures:
    """The record's figures.

    ``down``: the window in which the dependency was certainly gone (a 200
    that started and ended inside it cannot have been checked); ``recovered``:
    when the first request succeeded after the fault (every later one must
    succeed); ``audited``: the request ids in the ledger.
    """
    unavailable = [a for a in answers if a.status == 503]
    server_errors = [a for a in answers if a.status >= 500]
    ok = [a for a in answers if a.status == 200]
    unchecked = 0
    if down is not None:
        unchecked = sum(1 for a in ok if a.started >= down[0] and a.ended <= down[1])
    after = [a for a in answers if a.started >= recovered]
    return Figures(
        requests=len(answers),
        ok=len(ok),
        unchecked_200=unchecked,
        unavailable_503=len(unavailable),
        unavailable_seconds=_span(unavailable),
        refused_after_recovery=sum(1 for a in after if not a.complete),
        broken=sum(1 for a in answers if a.status == 0 or (a.status == 200 and not a.complete)),
        audit_rows_lost=sum(1 for a in ok if a.complete and a.request_id not in audited),
        leases_leaked=leases_leaked,
        server_errors=len(server_errors),
        server_error_seconds=_span(server_errors),
        budget_minus_ledger_tokens=budget_minus_ledger_tokens,
        reservations_held_tokens=reservations_held_tokens,
        statuses=",".join(
            f"{s}:{n}" for s, n in sorted(Counter(a.status for a in answers).items())
        ),
    )


def _span(answers: list[Answer]) -> float:
    """From the first answer's start to the last one's end (0 when there is none)."""
    if not answers:
        return 0.0
    return max(a.ended for a in answers) - min(a.started for a in answers)
