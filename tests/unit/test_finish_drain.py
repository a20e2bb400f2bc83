"""A request cancelled (client gone, shutdown) still gets its accounting, before the writer stops.

On fakes of the limiter and upstream; the audit writer is the real one (its
spool on a temporary directory, no Postgres needed for what is tested here).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.domain.accounting import AuditRow
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.proxy.routes import drain_finishing, proxied_fast_paths
from neuronetz_gateway.proxy.settle_retry import SettleRetries
from tests.unit.fakes import NOW, Client, FakeLimiter, FakeStream, Proxy

_DONE = b'{"message":{"content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":2}\n'
_BODY = json.dumps({"model": "llama3.2", "messages": []}).encode()


class HeldSettleLimiter(FakeLimiter):
    """Its settles wait for ``gate`` (a Redis round trip in flight); ``entered`` once one is."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def settle(self, **kwargs: Any) -> Allowance:
        self.entered.set()
        await self.gate.wait()
        return await super().settle(**kwargs)


def _chat(proxy: Proxy, client: Client) -> asyncio.Task[None]:
    scope = proxy.scope(
        "POST", "/api/chat", proxy.identity("chat", key_limits=Limits(daily_tokens=100_000))
    )
    serve = proxied_fast_paths()["/api/chat"]
    return asyncio.ensure_future(serve(scope, client.receive, client.send))


async def _no_pause(_: float) -> None:
    await asyncio.sleep(0)


async def test_a_cancel_during_the_last_settle_hands_it_to_the_retries() -> None:
    """The answer is sent, the settle's round trip is cut: the charge still lands."""
    limiter = HeldSettleLimiter()
    proxy = Proxy(limiter=limiter)
    retries = SettleRetries(
        limiter, reservation_ttl_seconds=1e9, clock=lambda: NOW, sleep=_no_pause
    )
    proxy.ctx.settle_retries = retries
    proxy.upstream.streams.append(FakeStream([_DONE]))
    client = Client(_BODY)
    task = _chat(proxy, client)
    await asyncio.wait_for(limiter.entered.wait(), 5)
    assert client.ended  # the client has its whole answer; finish is settling
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    (row,) = proxy.audit.audit_rows()
    assert (row.prompt_tokens, row.completion_tokens) == (3, 2)
    assert retries.pending == 1  # the cut settle is sent again
    limiter.gate.set()
    await asyncio.wait_for(retries.wait(), 5)
    ((_, actual),) = limiter.settled
    assert actual == 5


async def _cancelled_mid_stream(limiter: HeldSettleLimiter) -> Proxy:
    """A stream cancelled while its upstream holds; its finish is in the held settle."""
    proxy = Proxy(limiter=limiter)
    proxy.upstream.streams.append(
        FakeStream([b'{"message":{"content":"h"}}\n'], hold=asyncio.Event())
    )
    client = Client(_BODY)
    task = _chat(proxy, client)
    for _ in range(100):
        if client.parts:
            break
        await asyncio.sleep(0.01)
    assert client.parts  # streaming
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
    await asyncio.wait_for(limiter.entered.wait(), 5)  # its finish: settling, in its own task
    return proxy


async def test_a_cancelled_request_finishes_before_the_drain_returns() -> None:
    """Cancelled mid-stream: its finish runs on in a task, which the shutdown drain waits for."""
    limiter = HeldSettleLimiter()
    proxy = await _cancelled_mid_stream(limiter)
    draining = asyncio.ensure_future(drain_finishing(within=5))
    await asyncio.sleep(0.05)
    assert not draining.done()  # waits for the settle in flight
    limiter.gate.set()
    assert await asyncio.wait_for(draining, 5) == 0
    assert len(limiter.settled) == 1
    (row,) = proxy.audit.audit_rows()
    assert row.client_disconnected


async def test_the_drain_is_bounded_and_says_how_many_were_left() -> None:
    limiter = HeldSettleLimiter()
    await _cancelled_mid_stream(limiter)
    assert await drain_finishing(within=0.05) == 1
    limiter.gate.set()  # let it end (the set is module-wide)
    assert await drain_finishing(within=5) == 0


def _row(request_id: str) -> AuditRow:
    return msgspec.convert(
        {
            "request_id": request_id,
            "ts": "2026-01-01T00:00:00Z",
            "tenant_id": 7,
            "key_id": 11,
            "key_prefix": "nz_abcdefgh",
            "route": "chat",
            "model": "llama3.2",
            "status": 200,
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "ttfb_ms": 1,
            "duration_ms": 2,
            "streamed": True,
            "client_disconnected": False,
            "estimated": False,
            "revoked": False,
        },
        AuditRow,
    )


async def test_a_row_submitted_after_stop_reaches_the_spool(tmp_path: Path) -> None:
    """After stop nothing reads the queue and there is no journal: the row goes to the spool."""
    writer = AuditWriter(None, tmp_path, flush_interval=0.01)  # type: ignore[arg-type]
    await writer.start()
    await writer.stop()
    writer.submit(_row("late-1"))
    files = sorted(tmp_path.glob("*-audit.jsonl"))  # noqa: ASYNC240
    assert len(files) == 1
    (line,) = files[0].read_bytes().splitlines()
    assert msgspec.json.decode(line, type=AuditRow).request_id == "late-1"


async def test_the_drain_waits_for_a_settle_after_the_answer_went_out() -> None:
    """Not cancelled: the answer is sent, the request's own finish is still settling.

    A server may start the lifespan's shutdown once every answer is out (Granian
    does): the settle retries must still be there if that settle fails.
    """
    limiter = HeldSettleLimiter()
    proxy = Proxy(limiter=limiter)
    proxy.upstream.streams.append(FakeStream([_DONE]))
    client = Client(_BODY)
    task = _chat(proxy, client)
    await asyncio.wait_for(limiter.entered.wait(), 5)
    assert client.ended  # the whole answer is out; its finish is settling
    draining = asyncio.ensure_future(drain_finishing(within=5))
    await asyncio.sleep(0.05)
    assert not draining.done()  # waits for the settle in flight
    assert await drain_finishing(within=0.02) == 1
    limiter.gate.set()
    assert await asyncio.wait_for(draining, 5) == 0
    await asyncio.wait_for(task, 5)
    assert len(limiter.settled) == 1


class SlowEndClient(Client):
    """Its last body message is out (``ended``) before its ``send`` returns: the server
    has the whole answer while the request's task is not yet resumed."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.resume = asyncio.Event()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.ended:
            await self.resume.wait()


async def test_the_drain_waits_for_a_request_whose_last_send_has_not_returned() -> None:
    """The answer is out, the request's task not yet back from its last ``send`` (nor in
    its finish): a shutdown starting then waits for its accounting all the same."""
    limiter = HeldSettleLimiter()
    limiter.gate.set()
    proxy = Proxy(limiter=limiter)
    proxy.upstream.streams.append(FakeStream([_DONE]))
    client = SlowEndClient(_BODY)
    task = _chat(proxy, client)
    for _ in range(500):
        if client.ended:
            break
        await asyncio.sleep(0.01)
    assert client.ended
    draining = asyncio.ensure_future(drain_finishing(within=5))
    await asyncio.sleep(0.05)
    assert not draining.done()  # its row and settle are still to come
    client.resume.set()
    assert await asyncio.wait_for(draining, 5) == 0
    await asyncio.wait_for(task, 5)
    assert len(limiter.settled) == 1
    assert len(proxy.audit.audit_rows()) == 1
