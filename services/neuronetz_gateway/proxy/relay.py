"""Sending a request upstream and relaying the answer, chunk by chunk.

- :func:`forward`: the request to Ollama's fixed path; connection failures
  and timeouts become a :class:`Refusal` (502/504) in the dialect;
- :class:`ClientWatch`: notices a client that leaves (then closes the
  upstream connection, so Ollama stops generating) and renews the
  concurrency lease while a long answer runs;
- :func:`relay_ndjson`: native NDJSON passed through byte for byte, unbuffered;
  each complete line is decoded (as JSON, in any spelling) to find the final
  counts or an error;
- :func:`relay_sse`: Ollama NDJSON translated line by line into OpenAI SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import msgspec

from neuronetz_gateway.domain.accounting import response_text
from neuronetz_gateway.domain.openai_compat import (
    ChatStreamTranslator,
    CompletionStreamTranslator,
    error_event,
    ollama_error_to_openai,
)
from neuronetz_gateway.domain.stream_lines import LineSplitter, NativeStreamScan
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy.asgi import Receive, Send, end_body, send_body, start_response
from neuronetz_gateway.proxy.exchange import REVOKED_MESSAGE, Exchange
from neuronetz_gateway.proxy.ports import LimiterUnavailable, UpstreamError, UpstreamTimeout
from neuronetz_gateway.proxy.ports import UpstreamStream as UpstreamResponse
from neuronetz_gateway.proxy.refusals import (
    ClientLeft,
    Refusal,
    model_unavailable,
    upstream_unavailable,
)

__all__ = [
    "ClientWatch",
    "NativeStreamScan",
    "NdjsonScan",
    "ended_by_revocation",
    "forward",
    "read_whole",
    "relay_ndjson",
    "relay_sse",
    "upstream_refusal",
    "watch_client",
]

log = get_logger(__name__)

_NDJSON = b"application/x-ndjson"
_SSE = b"text/event-stream"
_LOST = b'{"error":"the model server closed the stream before it finished"}\n'
_REVOKED = msgspec.json.encode({"error": REVOKED_MESSAGE}) + b"\n"


async def forward(ex: Exchange, path: str, body: bytes | None) -> UpstreamResponse:
    """Send to Ollama (the identity claimed first); a refused connection or a timeout: 502/504."""
    await ex.claim()
    if ex.revoked:
        raise ex.revoked_refusal()
    ex.to_backend()
    # a task, so that a revocation can stop the wait for the answer's headers
    # (a non-streamed answer sends them only when it is complete)
    sending: asyncio.Future[UpstreamResponse] = asyncio.ensure_future(
        ex.ctx.upstream.open(ex.model_call(), path, body)
    )
    ex.upstream_wait = sending
    try:
        upstream = await sending
    except asyncio.CancelledError:
        if not ex.revoked:
            raise
        ex.charge_estimate(0)
        raise ex.revoked_refusal() from None
    except UpstreamTimeout:
        ex.upstream_error = "timeout"
        ex.ctx.metrics.upstream_errors.labels("timeout").inc()
        raise Refusal(504, "upstream_timeout", "the model server did not answer in time") from None
    except UpstreamError:
        ex.upstream_error = "unavailable"
        ex.ctx.metrics.upstream_errors.labels("unavailable").inc()
        raise upstream_unavailable() from None
    finally:
        ex.upstream_wait = None
    ex.upstream = upstream
    if ex.revoked:  # revoked while the request went out
        upstream.abort()
        raise ex.revoked_refusal()
    return upstream


class ClientWatch:
    """Watches for the client leaving; renews the lease every ``renew_every`` seconds."""

    __slots__ = ("_on_leave", "_receive", "_renew", "_renew_every", "_task", "left")

    def __init__(
        self,
        receive: Receive,
        on_leave: Callable[[], None],
        renew: Callable[[], Awaitable[None]] | None,
        renew_every: float,
    ) -> None:
        self._receive = receive
        self._on_leave = on_leave
        self._renew = renew
        self._renew_every = renew_every if renew is not None else None
        self.left = False
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        pending = asyncio.ensure_future(self._receive())
        try:
            while True:
                done, _ = await asyncio.wait((pending,), timeout=self._renew_every)
                if not done:
                    if self._renew is not None:
                        with contextlib.suppress(LimiterUnavailable):
                            await self._renew()
                    continue
                if pending.result()["type"] == "http.disconnect":
                    self.left = True
                    self._on_leave()
                    return
                pending = asyncio.ensure_future(self._receive())
        finally:
            if not pending.done():
                pending.cancel()

    async def close(self) -> None:
        """Stop watching (the answer is complete)."""
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        elif not self._task.cancelled():
            self._task.exception()  # retrieved, so asyncio does not log it


def watch_client(ex: Exchange, receive: Receive, upstream: UpstreamResponse) -> ClientWatch:
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


def ended_by_revocation(ex: Exchange) -> None:
    """The stream was cut because its key was revoked (the audit row says so)."""
    ex.status = 401


def _revoked_event() -> bytes:
    return error_event(REVOKED_MESSAGE, error_type="invalid_request_error", code="invalid_api_key")


def _midstream_failure(ex: Exchange, kind: str) -> None:
    ex.upstream_error = kind
    ex.status = 502
    ex.ctx.metrics.upstream_errors.labels(kind).inc()


async def relay_ndjson(
    ex: Exchange, upstream: UpstreamResponse, receive: Receive, send: Send
) -> None:
    """Pass a native NDJSON stream through as it arrives; count tokens on the way."""
    watch = watch_client(ex, receive, upstream)
    keep: list[bytes] | None = [] if ex.identity.log_prompts else None
    await start_response(send, 200, ex.headers(_NDJSON))
    ex.status = 200
    ex.responded = True
    ex.streamed = True
    scan = NativeStreamScan()
    try:
        async for data in upstream.chunks():
            await send_body(send, data)
            if ex.ttfb_ms is None:
                ex.mark_first_byte()
            if keep is not None:
                keep.append(data)
            scan.feed(data)
        scan.close()
        if ex.revoked:
            ended_by_revocation(ex)
            await send_body(send, _REVOKED)
        elif scan.error is not None:
            _midstream_failure(ex, "midstream")  # its error line went to the client
        elif scan.final is None and not watch.left:
            _midstream_failure(ex, "truncated")
            await send_body(send, _LOST)
    except UpstreamError as exc:
        if ex.revoked:
            ended_by_revocation(ex)
            with contextlib.suppress(Exception):
                await send_body(send, _REVOKED)
        elif not watch.left:
            _midstream_failure(ex, "timeout" if isinstance(exc, UpstreamTimeout) else "midstream")
            with contextlib.suppress(Exception):
                await send_body(send, _LOST)
    finally:
        upstream.abort()  # a no-op after a complete body; else Ollama must see the cancel
        await watch.close()
        ex.disconnected = watch.left
        final = scan.final
        if final is not None:
            ex.charge(final.prompt_eval_count or 0, final.eval_count or 0)
        else:
            ex.charge_estimate(scan.lines)
    if keep is not None:
        ex.response_text = response_text(b"".join(keep))
    if not watch.left:
        await end_body(send)


async def _end_sse(
    ex: Exchange,
    send: Send,
    translator: ChatStreamTranslator | CompletionStreamTranslator,
    *,
    left: bool,
) -> None:
    """After the upstream's last read: the error frame the stream still owes, if any."""
    if left:
        return
    if ex.revoked:
        ended_by_revocation(ex)
        await send_body(send, _revoked_event())
    elif not translator.finished:
        _midstream_failure(ex, "truncated")
        await send_body(send, error_event("the model server closed the stream early"))
    elif translator.failed:
        _midstream_failure(ex, "midstream")


async def relay_sse(
    ex: Exchange,
    upstream: UpstreamResponse,
    receive: Receive,
    send: Send,
    translator: ChatStreamTranslator | CompletionStreamTranslator,
) -> None:
    """Translate Ollama's NDJSON into OpenAI SSE frames as each line completes."""
    watch = watch_client(ex, receive, upstream)
    keep: list[bytes] | None = [] if ex.identity.log_prompts else None
    await start_response(send, 200, ex.headers(_SSE))
    ex.status = 200
    ex.responded = True
    ex.streamed = True
    splitter = LineSplitter()
    try:
        async for data in upstream.chunks():
            if keep is not None:
                keep.append(data)
            out = b"".join([translator.feed_line(line) for line in splitter.feed(data)])
            if out:
                await send_body(send, out)
                if ex.ttfb_ms is None:
                    ex.mark_first_byte()
        rest = splitter.rest()
        if rest.strip():
            out = translator.feed_line(rest)
            if out:
                await send_body(send, out)
        await _end_sse(ex, send, translator, left=watch.left)
    except (msgspec.DecodeError, msgspec.ValidationError):
        upstream.abort()
        _midstream_failure(ex, "unreadable")
        await send_body(send, error_event("the model server sent an unreadable stream"))
    except UpstreamError as exc:
        if ex.revoked:
            ended_by_revocation(ex)
            with contextlib.suppress(Exception):
                await send_body(send, _revoked_event())
        elif not watch.left:
            _midstream_failure(ex, "timeout" if isinstance(exc, UpstreamTimeout) else "midstream")
            with contextlib.suppress(Exception):
                await send_body(send, error_event("the model server stream broke off"))
    finally:
        upstream.abort()  # a no-op after a complete body; else Ollama must see the cancel
        await watch.close()
        ex.disconnected = watch.left
        _charge_translated(ex, translator)
    if keep is not None:
        ex.response_text = response_text(b"".join(keep))
    if not watch.left:
        await end_body(send)


async def read_whole(ex: Exchange, upstream: UpstreamResponse, receive: Receive) -> bytes:
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


async def upstream_refusal(ex: Exchange, upstream: UpstreamResponse) -> Refusal:
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
    ex.ctx.metrics.upstream_errors.labels(kind).inc()
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


def _charge_translated(
    ex: Exchange, translator: ChatStreamTranslator | CompletionStreamTranslator
) -> None:
    if translator.completion_tokens is not None and translator.prompt_tokens is not None:
        ex.charge(translator.prompt_tokens, translator.completion_tokens)
    else:
        ex.charge_estimate(translator.content_chunks)
