"""A failed settle is retried in the background, bounded by its reservation's TTL (on fakes).

The clock and the pauses are fakes: each pause moves the clock on by what was
asked, so a whole retry schedule runs at once and its timing is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.proxy.routes import proxied_fast_paths
from neuronetz_gateway.proxy.settle_retry import PendingSettle, SettleRetries, retry_delays
from tests.unit.fakes import Client, FakeLimiter, FakeStream, Proxy

TTL = 10.0
RESERVED_AT = 1_000.0


class FakeTime:
    """A clock that a pause moves on (by what was asked), and the pauses asked for."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def _pending(request_id: str = "r1") -> PendingSettle:
    return PendingSettle(
        request_id=request_id,
        tenant_id=7,
        key_id=11,
        reserved=300,
        actual=25,
        reserved_at=RESERVED_AT,
        release_lease_id="lease-1",
        reservation_id="resv-1",
    )


def _retries(limiter: FakeLimiter, time: FakeTime, outcomes: list[str]) -> SettleRetries:
    return SettleRetries(
        limiter,
        reservation_ttl_seconds=TTL,
        on_outcome=outcomes.append,
        clock=time.clock,
        sleep=time.sleep,
    )


async def _drained(retries: SettleRetries) -> None:
    await asyncio.wait_for(retries.wait(), 5)


def test_the_pauses_double_from_the_first_up_to_the_cap() -> None:
    assert list(itertools.islice(retry_delays(0.25, 2.0), 6)) == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


async def test_a_settle_that_fails_is_sent_again_until_it_lands() -> None:
    limiter = FakeLimiter(settle_failures=2)
    time, outcomes = FakeTime(RESERVED_AT + 1), []
    retries = _retries(limiter, time, outcomes)
    retries.retry(_pending())
    assert limiter.settle_attempts == []  # nothing ran yet: retry() only started a task
    await _drained(retries)
    assert time.pauses == [0.25, 0.5, 1.0]
    assert limiter.settle_attempts == ["resv-1"] * 3  # the same reservation each time
    assert limiter.settled == [(300, 25)]  # landed once
    assert limiter.released == ["lease-1"]  # the lease went with it
    assert outcomes == ["failed", "failed", "landed"]


async def test_it_gives_up_when_the_reservation_would_have_expired() -> None:
    limiter = FakeLimiter(settle_failures=10**6)
    time, outcomes = FakeTime(RESERVED_AT + 1), []
    retries = _retries(limiter, time, outcomes)
    retries.retry(_pending())
    await _drained(retries)
    assert limiter.settled == []
    assert time.now == RESERVED_AT + TTL  # the last pause ends at the expiry, not later
    assert sum(time.pauses) == TTL - 1
    # 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s of attempts, then the pause is cut to what is left
    assert time.pauses == [0.25, 0.5, 1.0, 2.0, 4.0, 1.25]
    assert outcomes == ["failed"] * 5 + ["gave_up"]  # no attempt at or after the expiry


async def test_a_reservation_already_expired_is_not_retried() -> None:
    limiter = FakeLimiter(settle_failures=1)
    time, outcomes = FakeTime(RESERVED_AT + TTL + 1), []
    retries = _retries(limiter, time, outcomes)
    retries.retry(_pending())
    await _drained(retries)
    assert (limiter.settle_attempts, time.pauses, outcomes) == ([], [], ["gave_up"])


async def test_shutdown_gives_up_what_is_still_pending() -> None:
    limiter = FakeLimiter(settle_failures=1)
    outcomes: list[str] = []
    never = asyncio.Event()

    async def stuck(_: float) -> None:
        await never.wait()

    retries = SettleRetries(
        limiter, reservation_ttl_seconds=TTL, on_outcome=outcomes.append, sleep=stuck
    )
    retries.retry(_pending("r1"))
    retries.retry(_pending("r2"))
    await asyncio.sleep(0)
    await retries.aclose()
    assert retries.pending == 0
    assert outcomes == ["gave_up", "gave_up"]
    assert limiter.settle_attempts == []


async def test_the_response_does_not_wait_for_the_retry() -> None:
    """Redis fails at settle time: the client has its whole answer, the charge lands later."""
    proxy = Proxy()
    proxy.limiter.settle_failures = 1
    gate = asyncio.Event()
    outcomes: list[str] = []

    async def held(_: float) -> None:
        await gate.wait()

    retries = SettleRetries(
        proxy.limiter,
        reservation_ttl_seconds=TTL,
        on_outcome=outcomes.append,
        clock=lambda: RESERVED_AT,  # the proxy's fake clock is far earlier: in time
        sleep=held,
    )
    proxy.ctx.settle_retries = retries
    proxy.upstream.streams.append(
        FakeStream(
            [b'{"message":{"content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":2}\n']
        )
    )
    client = Client(json.dumps({"model": "llama3.2", "messages": []}).encode())
    scope = proxy.scope(
        "POST", "/api/chat", proxy.identity("chat", key_limits=Limits(daily_tokens=100_000))
    )
    proxy.ctx.clock = lambda: RESERVED_AT
    await asyncio.wait_for(proxied_fast_paths()["/api/chat"](scope, client.receive, client.send), 5)

    assert client.status == 200
    assert client.ended
    assert proxy.limiter.settled == []  # the first settle failed; the retry is held
    assert retries.pending == 1
    (row,) = proxy.audit.audit_rows()
    assert (row.prompt_tokens, row.completion_tokens) == (3, 2)
    gate.set()
    await _drained(retries)
    ((_, actual),) = proxy.limiter.settled
    assert actual == 5
    assert outcomes == ["landed"]


@pytest.mark.parametrize(
    ("path", "route", "stream"),
    [("/api/chat", "chat", True), ("/v1/chat/completions", "v1.chat.completions", False)],
)
async def test_a_retried_settle_says_when_its_audit_row_was_queued(
    path: str, route: str, stream: bool
) -> None:
    """A settle sent before the row was queued is retried only after it, saying when."""
    proxy = Proxy()
    proxy.limiter.settle_failures = 1
    time = FakeTime(RESERVED_AT)
    retries = SettleRetries(
        proxy.limiter, reservation_ttl_seconds=TTL, clock=time.clock, sleep=time.sleep
    )
    proxy.ctx.settle_retries = retries
    proxy.upstream.streams.append(
        FakeStream(
            [b'{"message":{"content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":2}\n']
        )
    )
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    client = Client(json.dumps(body).encode())
    scope = proxy.scope(
        "POST", path, proxy.identity(route, key_limits=Limits(daily_tokens=100_000))
    )
    proxy.ctx.clock = lambda: RESERVED_AT
    await asyncio.wait_for(proxied_fast_paths()[path](scope, client.receive, client.send), 5)
    await _drained(retries)

    assert client.status == 200
    assert len(proxy.limiter.settled) == 1
    first, retried = proxy.limiter.settle_audited_at
    assert retried is not None  # a rebuild after it holds the row: settle.lua charges once
    # a whole answer settles before its row is queued (for the response's headers)
    assert first == (retried if stream else None)
