"""Sending a request upstream and relaying the answer, chunk by chunk.

- :func:`forward`: the request to Ollama's fixed path; connection failures
  and timeouts become a :class:`Refusal` (502/504) in the dialect;
- :class:`QueueWait`: a streamed call that waits for a backend's slot: the
  client watched, and kept posted with the surface's keep-alive frame;
  :func:`refuse_in_stream` for a refusal after such a stream started;
- :class:`ClientWatch`: notices a client that leaves (then closes the
  upstream connection, so Ollama stops generating) and renews the
  concurrency lease while a long answer runs;
- :func:`relay_stream`: a streamed answer through the surface's
  :class:`StreamFrames`: :class:`NativeFrames` pass native NDJSON through
  byte for byte, unbuffered, decoding each complete line (as JSON, in any
  spelling) only to find the final counts or an error;
  :class:`TranslatedFrames` translate it line by line (OpenAI SSE),
  :class:`EventFrames` too, with an opening event and keep-alives (the
  agent surfaces);
- :func:`read_whole`: a non-streamed answer, watching the client meanwhile;
- :func:`upstream_refusal`: Ollama's non-200 answer in the surface's dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Protocol

import msgspec

from neuronetz_gateway.domain.accounting import response_text
from neuronetz_gateway.domain.dialect import NATIVE, OPENAI, error_body
from neuronetz_gateway.domain.openai_compat import error_event, ollama_error_to_openai
from neuronetz_gateway.domain.stream_lines import LineSplitter, NativeStreamScan
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.asgi import Receive, Send, end_body, send_body, start_response
from neuronetz_gateway.proxy.exchange import REVOKED_MESSAGE, Exchange
from neuronetz_gateway.proxy.ports import (
    LimiterUnavailable,
    UpstreamError,
    UpstreamStream,
    UpstreamTimeout,
)
from neuronetz_gateway.proxy.refusals import (
    ClientLeft,
    Refusal,
    model_unavailable,
    upstream_unavailable,
)

__all__ = [
    "KEEPALIVE_SECONDS",
    "ClientWatch",
    "EventFrames",
    "EventTranslator",
    "Failure",
    "NativeFrames",
    "NativeStreamScan",
    "NdjsonScan",
    "QueueWait",
    "StreamFrames",
    "TranslatedFrames",
    "ended_by_revocation",
    "forward",
    "lines_or_silence",
    "read_whole",
    "refuse_in_stream",
    "relay_stream",
    "start_stream",
    "upstream_refusal",
    "watch_client",
]

log = get_logger(__name__)

_NDJSON = b"application/x-ndjson"
_SSE = b"text/event-stream"
_LOST_MESSAGE = "the model server closed the stream before it finished"
_LOST = error_body(NATIVE, 502, "upstream_error", _LOST_MESSAGE) + b"\n"
_REVOKED = error_body(NATIVE, 401, "invalid_api_key", REVOKED_MESSAGE) + b"\n"


async def forward(
    ex: Exchange,
    path: str,
    body: bytes | None,
    *,
    stream: bool = False,
    waiting: QueueWait | None = None,
) -> UpstreamStream:
    """Send to Ollama (the identity claimed first); a refused connection or a timeout: 502/504.

    ``waiting``: what to do if the upstream makes the call wait for a slot
    (:class:`QueueWait`); it ends when the upstream's answer is in.
    """
    await ex.claim()
    if ex.revoked:
        raise ex.revoked_refusal()
    # a task, so that a revocation (or a client leaving while queued) can stop the wait
    # for the answer's headers (a non-streamed answer sends them only when it is complete)
    call = ex.model_call(stream=stream, on_queued=None if waiting is None else waiting.queued)
    sending: asyncio.Future[UpstreamStream] = asyncio.ensure_future(
        ex.ctx.upstream.open(call, path, body)
    )
    ex.upstream_wait = sending
    try:
        upstream = await sending
    except asyncio.CancelledError:
        if waiting is not None and waiting.left and not _cancelling():
            raise ClientLeft from None  # its place in the queue is given back
        if not ex.revoked:
            raise
        ex.charge_estimate(0)
        raise ex.revoked_refusal() from None
    except UpstreamTimeout:
        ex.upstream_error = "timeout"
        ex.ctx.metrics.child(ex.ctx.metrics.upstream_errors, "timeout").inc()
        raise Refusal(504, "upstream_timeout", "the model server did not answer in time") from None
    except UpstreamError:
        ex.upstream_error = "unavailable"
        ex.ctx.metrics.child(ex.ctx.metrics.upstream_errors, "unavailable").inc()
        raise upstream_unavailable() from None
    finally:
        ex.upstream_wait = None
        if waiting is not None:
            await waiting.stop()
    ex.upstream = upstream
    if ex.revoked:  # revoked while the request went out
        upstream.abort()
        raise ex.revoked_refusal()
    return upstream


def _cancelling() -> int:
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


class QueueWait:
    """A call waiting for a backend's slot: the client watched, a stream kept posted.

    Nothing runs until the upstream reports the call queued (:meth:`queued`,
    the call's ``ModelCall.on_queued``): a call with a slot free at once costs
    no task and no timer. From then on one task watches the client (one that
    leaves cancels the wait, which gives its place in the queue back) and, on
    a surface with a keep-alive frame (``frames.ping()`` not empty: SSE
    comments, Anthropic's ``ping``), starts the response after ``every``
    seconds (200 and the surface's headers) and sends the frame every
    ``every`` seconds until the answer's headers are in. Native streams and
    whole answers (``frames`` ``None``) get no byte while queued, only the
    watch. :meth:`stop` (by :func:`forward`) ends it between two sends,
    never in the middle of one.
    """

    __slots__ = ("_every", "_ex", "_frames", "_receive", "_send", "_stop", "_task", "left")

    def __init__(
        self, ex: Exchange, receive: Receive, send: Send, frames: StreamFrames | None, every: float
    ) -> None:
        self._ex = ex
        self._receive = receive
        self._send = send
        self._frames = frames
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Future[None] | None = None
        self.left = False

    def queued(self) -> None:
        """The upstream queued the call: watch and ping from now on (idempotent)."""
        if self._task is None:
            self._stop = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._run(self._stop))

    async def stop(self) -> None:
        """The wait is over (granted, refused or cancelled): end the task, after its send."""
        task, stop = self._task, self._stop
        if task is None or stop is None:
            return
        if not stop.done():
            stop.set_result(None)
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.cancelled() and task.exception() is not None:
            log.warning("queue_wait_failed", error=repr(task.exception()))

    async def _run(self, stop: asyncio.Future[None]) -> None:
        frames = self._frames
        every: float | None = self._every if frames is not None and frames.ping() else None
        receiving = asyncio.ensure_future(self._receive())
        try:
            while True:
                done, _ = await asyncio.wait(
                    (receiving, stop), timeout=every, return_when=asyncio.FIRST_COMPLETED
                )
                if stop.done():
                    return
                if receiving in done:
                    if receiving.result()["type"] == "http.disconnect":
                        self._leave()
                        return
                    receiving = asyncio.ensure_future(self._receive())
                    continue
                if frames is None:  # a timeout only where there is a frame to send
                    continue
                try:
                    await self._ping(frames)
                except OSError:
                    self._leave()
                    return
        finally:
            if not receiving.done():
                receiving.cancel()

    async def _ping(self, frames: StreamFrames) -> None:
        if not self._ex.responded:
            await start_stream(self._ex, self._send, frames)
        await send_body(self._send, frames.ping())

    def _leave(self) -> None:
        self.left = True
        sending = self._ex.upstream_wait
        if sending is not None:
            sending.cancel()


async def start_stream(ex: Exchange, send: Send, frames: StreamFrames) -> None:
    """The streamed response's start: 200 and the surface's headers (once)."""
    await start_response(send, 200, ex.headers(frames.content_type))
    ex.status = 200
    ex.responded = True
    ex.streamed = True


async def refuse_in_stream(
    ex: Exchange, send: Send, frames: StreamFrames, refusal: Refusal
) -> None:
    """A refusal after the response started while the call was queued (a queue timeout,
    no backend, a backend's error): the surface's error frame, then the end."""
    ex.status = refusal.status
    with contextlib.suppress(OSError):
        await send_body(send, frames.refused(refusal.status, refusal.code, refusal.message))
        await end_body(send)


class ClientWatch:
    """Watches for the client leaving; renews the lease every ``renew_every`` seconds.

    No task of its own: a done-callback on the pending ``receive()`` (Granian's
    is a future, so nothing wraps it) sees the disconnect, and one timer per
    ``renew_every`` starts a renewal (a task only then, so a short answer costs
    a callback and a timer, not a task and an ``asyncio.wait`` per request).
    """

    __slots__ = (
        "_closed",
        "_loop",
        "_on_leave",
        "_pending",
        "_receive",
        "_renew",
        "_renew_every",
        "_renewing",
        "_timer",
        "left",
    )

    def __init__(
        self,
        receive: Receive,
        on_leave: Callable[[], None],
        renew: Callable[[], Awaitable[None]] | None,
        renew_every: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._receive = receive
        self._on_leave = on_leave
        self._renew = renew
        self._renew_every = renew_every
        self._renewing: asyncio.Task[None] | None = None
        self._closed = False
        self.left = False
        self._timer: asyncio.TimerHandle | None = (
            self._loop.call_later(renew_every, self._due) if renew is not None else None
        )
        self._pending: asyncio.Future[Any] = asyncio.ensure_future(receive())
        self._pending.add_done_callback(self._received)

    def _received(self, pending: asyncio.Future[Any]) -> None:
        if self._closed or pending.cancelled():
            return
        if pending.exception() is not None:  # the server's receive failed: watch no more
            self._stop_renewing()
            return
        if pending.result()["type"] == "http.disconnect":
            self.left = True
            self._stop_renewing()
            self._on_leave()
            return
        self._pending = asyncio.ensure_future(self._receive())  # a stray body message
        self._pending.add_done_callback(self._received)

    def _due(self) -> None:
        self._timer = None
        if self._closed or self.left or self._renew is None:
            return
        self._renewing = asyncio.ensure_future(self._renew_once(self._renew))

    async def _renew_once(self, renew: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(LimiterUnavailable):
            await renew()
        self._renewing = None
        if not self._closed and not self.left:
            self._timer = self._loop.call_later(self._renew_every, self._due)

    def _stop_renewing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        """Stop watching (the answer is complete)."""
        self._closed = True
        self._stop_renewing()
        pending = self._pending
        if not pending.done():
            pending.remove_done_callback(self._received)
            pending.cancel()
        renewing, self._renewing = self._renewing, None
        if renewing is not None and not renewing.done():
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        elif renewing is not None and not renewing.cancelled():
            renewing.exception()  # retrieved, so asyncio does not log it


def watch_client(ex: Exchange, receive: Receive, upstream: UpstreamStream) -> ClientWatch:
    """A :class:`ClientWatch` that aborts ``upstream`` when the client leaves."""
    identity = ex.identity
    renew: Callable[[], Awaitable[None]] | None = None
    lease_id = identity.lease_id
    if lease_id is not None:
        limiter = ex.ctx.limiter

        async def renew() -> None:
            await limiter.renew_lease(
                tenant_id=identity.tenant_id, key_id=identity.key_id, lease_id=lease_id
            )

    return ClientWatch(receive, upstream.abort, renew, ex.ctx.settings.lease_ttl_seconds / 3)


#: The name the relay used before the scan moved to the domain.
NdjsonScan = NativeStreamScan

#: Seconds of upstream silence after which a surface with a keep-alive sends one.
KEEPALIVE_SECONDS = 10.0

#: Why a stream ends with the surface's error frame.
Failure = Literal["revoked", "truncated", "broken", "unreadable"]
FAILURE_MESSAGES: dict[Failure, str] = {
    "revoked": REVOKED_MESSAGE,
    "truncated": "the model server closed the stream early",
    "broken": "the model server stream broke off",
    "unreadable": "the model server sent an unreadable stream",
}


class StreamFrames(Protocol):
    """A surface's side of a stream: Ollama's NDJSON reads in, the client's frames out.

    Exactly one of ``passthrough`` (native: the reads go out unchanged, it only
    reads along, after each send) and ``feed_line`` (a translating surface: one
    complete Ollama line in, its frames out; the relay cuts the lines) is set.
    ``finished``: the upstream's final (or error) line arrived; ``failed``: it
    was an error line (already relayed in the surface's words). After the
    stream, :meth:`counts` are Ollama's exact ``(prompt, completion)``, or
    ``None``: then the prompt estimate and ``chunks`` are charged.
    :meth:`ping` is the surface's keep-alive frame (``b""``: it has none);
    :meth:`refused` renders a refusal once the stream started (while queued).
    """

    content_type: bytes
    keepalive: float | None  # seconds of silence before ping(); None: never
    passthrough: Callable[[bytes], None] | None
    feed_line: Callable[[bytes], bytes] | None

    @property
    def finished(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def chunks(self) -> int: ...

    def opening(self) -> bytes: ...
    def close(self) -> None: ...
    def ping(self) -> bytes: ...
    def fail(self, failure: Failure) -> bytes: ...
    def refused(self, status: int, code: str, message: str) -> bytes: ...
    def counts(self) -> tuple[int, int] | None: ...


class NativeFrames:
    """Native ``/api/*``: every read goes out as it came; the scan only reads along."""

    __slots__ = ("passthrough", "scan")
    content_type: bytes = _NDJSON
    keepalive: float | None = None
    feed_line: Callable[[bytes], bytes] | None = None

    def __init__(self) -> None:
        self.scan = NativeStreamScan()
        self.passthrough: Callable[[bytes], None] | None = self.scan.feed

    @property
    def finished(self) -> bool:
        return self.scan.final is not None or self.scan.error is not None

    @property
    def failed(self) -> bool:
        return self.scan.error is not None

    @property
    def chunks(self) -> int:
        return self.scan.lines

    def opening(self) -> bytes:
        return b""

    def close(self) -> None:
        self.scan.close()

    def ping(self) -> bytes:
        return b""

    def fail(self, failure: Failure) -> bytes:
        return _REVOKED if failure == "revoked" else _LOST

    def refused(self, status: int, code: str, message: str) -> bytes:
        return error_body(NATIVE, status, code, message) + b"\n"

    def counts(self) -> tuple[int, int] | None:
        final = self.scan.final
        if final is None:
            return None
        return final.prompt_eval_count or 0, final.eval_count or 0


class LineTranslator(Protocol):
    """A domain stream translator: one Ollama line in, the surface's events out."""

    finished: bool
    failed: bool
    content_chunks: int
    prompt_tokens: int | None
    completion_tokens: int | None

    def feed_line(self, line: bytes) -> bytes: ...
    def fail(self, message: str) -> bytes: ...


class EventTranslator(LineTranslator, Protocol):
    """A translator with an opening and a keep-alive (the agent surfaces')."""

    def opening(self) -> bytes: ...
    def ping(self) -> bytes: ...
    def refused(self, status: int, code: str, message: str) -> bytes: ...


class TranslatedFrames:
    """A translating surface (OpenAI SSE): each Ollama line through its translator."""

    __slots__ = ("_translator", "feed_line", "keepalive")
    content_type: bytes = _SSE
    passthrough: Callable[[bytes], None] | None = None

    def __init__(self, translator: LineTranslator, *, keepalive: float | None = None) -> None:
        self._translator = translator
        # the translator's own method: no wrapper call per line
        self.feed_line: Callable[[bytes], bytes] | None = translator.feed_line
        self.keepalive = keepalive

    @property
    def finished(self) -> bool:
        return self._translator.finished

    @property
    def failed(self) -> bool:
        return self._translator.failed

    @property
    def chunks(self) -> int:
        return self._translator.content_chunks

    def opening(self) -> bytes:
        return b""

    def close(self) -> None:
        return None

    def ping(self) -> bytes:
        # an SSE comment: OpenAI's SDKs skip it (sent only while queued: ``keepalive`` None)
        return b"" if self._translator.finished else b": ping\n\n"

    def fail(self, failure: Failure) -> bytes:
        if failure == "revoked":
            return error_event(
                REVOKED_MESSAGE, error_type="invalid_request_error", code="invalid_api_key"
            )
        return error_event(FAILURE_MESSAGES[failure])

    def refused(self, status: int, code: str, message: str) -> bytes:
        # the error object an OpenAI client raises on, as its non-streamed answer has it
        return b"data: " + error_body(OPENAI, status, code, message) + b"\n\n"

    def counts(self) -> tuple[int, int] | None:
        translator = self._translator
        if translator.completion_tokens is None or translator.prompt_tokens is None:
            return None
        return translator.prompt_tokens, translator.completion_tokens


class EventFrames(TranslatedFrames):
    """An agent surface: an opening event, keep-alives while quiet, its own error event."""

    __slots__ = ("_events",)

    def __init__(self, translator: EventTranslator) -> None:
        super().__init__(translator, keepalive=KEEPALIVE_SECONDS)
        self._events = translator

    def opening(self) -> bytes:
        return self._events.opening()

    def ping(self) -> bytes:
        return self._events.ping()

    def fail(self, failure: Failure) -> bytes:
        return self._events.fail(FAILURE_MESSAGES[failure])

    def refused(self, status: int, code: str, message: str) -> bytes:
        return self._events.refused(status, code, message)


def ended_by_revocation(ex: Exchange) -> None:
    """The stream was cut because its key was revoked (the audit row says so)."""
    ex.status = 401


def _midstream_failure(ex: Exchange, kind: str) -> None:
    ex.upstream_error = kind
    ex.status = 502
    ex.ctx.metrics.child(ex.ctx.metrics.upstream_errors, kind).inc()


class _QuietSpells:
    """``asyncio.wait((read,), timeout=every)`` for one stream's reads, one after another.

    ``asyncio.wait`` sets a timer per read (a heap entry, pushed and cancelled
    again a few ms later, 20 times a stream); here one timer serves the whole
    stream: it is set when a wait finds none, and when it fires it either ends
    a wait that has lasted ``every`` seconds or is set for when the current
    wait will have.
    """

    __slots__ = ("_every", "_loop", "_since", "_timer", "_waiter")

    def __init__(self, every: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._every = every
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[bool] | None = None

    async def wait(self, read: asyncio.Future[bytes]) -> bool:
        """True once ``read`` is done; False if ``every`` seconds passed first."""
        loop = self._loop
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        self._since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._since + self._every, self._fire)
        read.add_done_callback(self._done)  # (called soon if done already, as asyncio.wait)
        try:
            return await waiter
        finally:
            read.remove_done_callback(self._done)
            self._waiter = None

    def _done(self, _: asyncio.Future[bytes]) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _fire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait sets the timer again
        due = self._since + self._every
        if due <= self._loop.time() + _CLOCK_RESOLUTION:
            waiter.set_result(False)
        else:  # set while an earlier wait ran: this one began later
            self._timer = self._loop.call_at(due, self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


#: A loop runs a timer up to this early (``BaseEventLoop._clock_resolution``).
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


async def lines_or_silence(
    chunks: AsyncIterator[bytes], every: float
) -> AsyncIterator[bytes | None]:
    """The upstream's reads, and ``None`` after each ``every`` seconds without one."""
    quiet = _QuietSpells(every)
    pending = asyncio.ensure_future(anext(chunks))
    try:
        while True:
            if not await quiet.wait(pending):
                yield None
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                return
            yield data
            pending = asyncio.ensure_future(anext(chunks))
    finally:
        quiet.close()
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, UpstreamError):
                await pending


async def _pass_frames(
    ex: Exchange,
    upstream: UpstreamStream,
    send: Send,
    frames: StreamFrames,
    keep: list[bytes] | None,
) -> None:
    """Every upstream read through ``frames`` to the client, as it arrives."""
    read_along = frames.passthrough
    if read_along is not None:  # native: byte for byte, the scan after the send
        async for data in upstream.chunks():
            # send_body's message, sent here: no coroutine of its own per chunk
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if ex.ttfb_ms is None:
                ex.mark_first_byte()
            if keep is not None:
                keep.append(data)
            read_along(data)
        frames.close()
        return
    feed_line = frames.feed_line
    if feed_line is None:
        raise TypeError("StreamFrames sets passthrough or feed_line")
    splitter = LineSplitter()
    reads: AsyncIterator[bytes | None] = (
        upstream.chunks()
        if frames.keepalive is None
        else lines_or_silence(aiter(upstream.chunks()), frames.keepalive)
    )
    async for read in reads:
        if read is None:  # quiet for ``keepalive`` seconds
            await send_body(send, frames.ping())
            continue
        if keep is not None:
            keep.append(read)
        out = b"".join([feed_line(line) for line in splitter.feed(read)])
        if out:
            await send_body(send, out)
            if ex.ttfb_ms is None:
                ex.mark_first_byte()
    rest = splitter.rest()
    if rest.strip():
        out = feed_line(rest)
        if out:
            await send_body(send, out)


async def relay_stream(
    ex: Exchange, upstream: UpstreamStream, receive: Receive, send: Send, frames: StreamFrames
) -> None:
    """Relay a streamed answer through the surface's ``frames``; charge what it cost.

    The stream's end is checked in this order: a client that left gets
    nothing more; a revoked key ends with the surface's error (401 in the
    audit row); an error line from Ollama (already relayed) is a mid-stream
    failure; a stream without its final line ends with the surface's error.
    """
    watch = watch_client(ex, receive, upstream)
    keep: list[bytes] | None = [] if ex.identity.log_prompts else None
    if not ex.responded:  # else started while the call was queued (QueueWait)
        await start_stream(ex, send, frames)
    opening = frames.opening()
    if opening:
        await send_body(send, opening)
    try:
        await _pass_frames(ex, upstream, send, frames, keep)
        if watch.left:
            pass
        elif ex.revoked:
            ended_by_revocation(ex)
            await send_body(send, frames.fail("revoked"))
        elif frames.failed:
            _midstream_failure(ex, "midstream")  # its error went to the client
        elif not frames.finished:
            _midstream_failure(ex, "truncated")
            await send_body(send, frames.fail("truncated"))
    except (msgspec.DecodeError, msgspec.ValidationError):
        upstream.abort()
        _midstream_failure(ex, "unreadable")
        await send_body(send, frames.fail("unreadable"))
    except UpstreamError as exc:
        if ex.revoked:
            ended_by_revocation(ex)
            with contextlib.suppress(Exception):
                await send_body(send, frames.fail("revoked"))
        elif not watch.left:
            _midstream_failure(ex, "timeout" if isinstance(exc, UpstreamTimeout) else "midstream")
            with contextlib.suppress(Exception):
                await send_body(send, frames.fail("broken"))
    finally:
        upstream.abort()  # a no-op after a complete body; else Ollama must see the cancel
        await watch.close()
        ex.disconnected = watch.left
        counts = frames.counts()
        if counts is not None:
            ex.charge(*counts)
        else:
            ex.charge_estimate(frames.chunks)
    if keep is not None:
        ex.response_text = response_text(b"".join(keep))
    if not watch.left:
        await end_body(send)


async def read_whole(ex: Exchange, upstream: UpstreamStream, receive: Receive) -> bytes:
    """A non-streamed answer, read while watching the client (who may leave: ClientLeft)."""
    watch = watch_client(ex, receive, upstream)
    # a task, so that a revocation can stop the wait (closing the connection
    # alone does not wake a pending read of a whole body)
    reading: asyncio.Future[bytes] = asyncio.ensure_future(upstream.read())
    ex.upstream_wait = reading
    try:
        data = await reading
    except asyncio.CancelledError:
        if not ex.revoked:
            raise
        upstream.abort()
        ex.charge_estimate(0)
        raise ex.revoked_refusal() from None
    except UpstreamError as exc:
        upstream.abort()
        if ex.revoked:
            ex.charge_estimate(0)
            raise ex.revoked_refusal() from None
        if watch.left:
            ex.disconnected = True
            ex.charge_estimate(0)
            raise ClientLeft from None
        _midstream_failure(ex, "timeout" if isinstance(exc, UpstreamTimeout) else "midstream")
        ex.charge_estimate(0)
        raise upstream_unavailable("the model server broke off its answer") from None
    finally:
        ex.upstream_wait = None
        await watch.close()
    upstream.release()
    if ex.ttfb_ms is None:
        ex.mark_first_byte()
    return data


class _ErrorView(msgspec.Struct):
    error: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorView)


async def upstream_refusal(ex: Exchange, upstream: UpstreamStream) -> Refusal:
    """Ollama's non-200 answer as a refusal in the dialect (404 -> the model 403)."""
    status = upstream.status
    try:
        data = await upstream.read()
        upstream.release()
    except UpstreamError:
        upstream.abort()
        data = b""
    try:
        message = _error_decoder.decode(data).error or ""
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = ""
    message = message or f"the model server answered {status}"
    kind = "busy" if status == 503 else "status"
    ex.upstream_error = f"{kind}:{status}"
    ex.ctx.metrics.child(ex.ctx.metrics.upstream_errors, kind).inc()
    if status == 404 and ex.model is not None:
        # the discovery cache was stale: answer exactly as for any unavailable model
        ex.ctx.discovery.forget()
        return model_unavailable(ex.model, ex.surface)
    if ex.surface == "openai":
        mapped, body = ollama_error_to_openai(status, message)
        return Refusal(mapped, "upstream_error", message, body=body, retry_after=_retry(status))
    if status == 503:
        return Refusal(503, "service_unavailable", message, retry_after=1)
    if 400 <= status < 500:
        return Refusal(status, "invalid_request", message)
    return Refusal(502, "upstream_error", message)


def _retry(status: int) -> int | None:
    return 1 if status in {429, 503} else None
