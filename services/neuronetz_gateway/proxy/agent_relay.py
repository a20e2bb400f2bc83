"""The pipeline the agent surfaces (Anthropic Messages, OpenAI Responses) share.

Both translate their request into one Ollama ``/api/chat`` call
(:class:`~neuronetz_gateway.domain.ollama_chat.ChatRequest`) and hand it to
:func:`run_chat`: the model check, the key's output cap, the reservation,
prompt logging, forwarding, and then either one translated body or the
event stream of an :class:`EventTranslator`, charged and settled like every
other surface. While the model is slow, :func:`relay_events` sends the
translator's keep-alive (Anthropic's ``ping``) so that clients and
intermediaries do not give up on a quiet connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from neuronetz_gateway.domain.accounting import (
    capped_num_predict,
    plan_output,
    response_text,
    token_room,
)
from neuronetz_gateway.domain.ollama_chat import (
    ChatChunk,
    ChatOptions,
    ChatRequest,
    SurfaceError,
    decode_chat_chunk,
    encode_chat_request,
    estimate_chat_prompt,
)
from neuronetz_gateway.domain.options import output_limit
from neuronetz_gateway.proxy.asgi import Receive, Send, end_body, send_body, start_response
from neuronetz_gateway.proxy.exchange import REVOKED_MESSAGE, Exchange
from neuronetz_gateway.proxy.ports import UpstreamError, UpstreamTimeout
from neuronetz_gateway.proxy.ports import UpstreamStream as UpstreamResponse
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.relay import (
    ended_by_revocation,
    forward,
    read_whole,
    upstream_refusal,
    watch_client,
)

__all__ = [
    "KEEPALIVE_SECONDS",
    "EventTranslator",
    "lines_or_silence",
    "refuse_input",
    "relay_events",
    "run_chat",
]

#: Seconds of upstream silence after which a keep-alive event goes out.
KEEPALIVE_SECONDS = 10.0
_JSON = b"application/json"
_SSE = b"text/event-stream"


class EventTranslator(Protocol):
    """Ollama NDJSON lines -> a surface's server-sent events."""

    finished: bool
    failed: bool
    content_chunks: int
    prompt_tokens: int | None
    completion_tokens: int | None

    def opening(self) -> bytes: ...
    def ping(self) -> bytes: ...
    def feed_line(self, line: bytes) -> bytes: ...
    def fail(self, message: str) -> bytes: ...


def refuse_input(exc: SurfaceError, body: Callable[[str], bytes] | None = None) -> Refusal:
    """A 400 for a request the surface cannot translate (``body``: in the dialect)."""
    return Refusal(
        400,
        "invalid_request_error",
        exc.message,
        param=exc.param,
        body=body(exc.message) if body is not None else None,
    )


def _cap_output(ex: Exchange, request: ChatRequest) -> int | None:
    """Clamp ``num_predict`` to the key's cap (never refused for being large)."""
    options = request.options
    requested = options.num_predict if options is not None else None
    # read as Ollama reads it first: one past any bound is unbounded (domain/options.py)
    capped = capped_num_predict(
        output_limit("max_tokens", requested), ex.identity.caps.max_num_predict
    )
    if capped != requested:
        if options is None:
            request.options = ChatOptions(num_predict=capped)
        else:
            options.num_predict = capped
    return capped


def _reservation(ex: Exchange, request: ChatRequest, estimate: int, output: int | None) -> int:
    """What to reserve; without a client cap, the planned one is forwarded (as on /v1/chat)."""
    plan = plan_output(
        output, ex.ctx.settings.default_max_tokens, estimate, token_room(ex.identity.allowance)
    )
    if plan.forward_cap:
        if request.options is None:
            request.options = ChatOptions(num_predict=plan.output)
        else:
            request.options.num_predict = plan.output
    return estimate + plan.output


async def run_chat(
    ex: Exchange,
    receive: Receive,
    send: Send,
    raw: bytes,
    request: ChatRequest,
    *,
    translator: Callable[[int], EventTranslator],
    body_of: Callable[[ChatChunk], bytes],
) -> None:
    """Cap, reserve, forward to ``/api/chat`` and answer (events when streaming)."""
    output = _cap_output(ex, request)
    estimate = estimate_chat_prompt(request)
    await ex.reserve(estimate, _reservation(ex, request, estimate, output))
    if ex.identity.log_prompts:
        ex.prompt_text = raw.decode("utf-8", "replace")
    upstream = await forward(ex, "/api/chat", encode_chat_request(request))
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    if request.stream:
        await relay_events(ex, upstream, receive, send, translator(estimate))
        return
    data = await read_whole(ex, upstream, receive)
    try:
        chunk = decode_chat_chunk(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        ex.upstream_error = "unreadable"
        ex.charge_estimate(0)
        raise Refusal(502, "upstream_error", "the model server sent an unreadable answer") from None
    if chunk.error is not None:
        ex.upstream_error = "midstream"
        ex.charge_estimate(0)
        raise Refusal(502, "upstream_error", chunk.error)
    ex.charge(chunk.prompt_eval_count or 0, chunk.eval_count or 0)
    if ex.identity.log_prompts:
        ex.response_text = response_text(data)
    await ex.settle()
    await ex.respond(send, 200, body_of(chunk), _JSON)


async def lines_or_silence(
    chunks: AsyncIterator[bytes], every: float
) -> AsyncIterator[bytes | None]:
    """The upstream's reads, and ``None`` after each ``every`` seconds without one."""
    pending = asyncio.ensure_future(anext(chunks))
    try:
        while True:
            done, _ = await asyncio.wait((pending,), timeout=every)
            if not done:
                yield None
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                return
            yield data
            pending = asyncio.ensure_future(anext(chunks))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, UpstreamError):
                await pending


def _midstream_failure(ex: Exchange, kind: str) -> None:
    ex.upstream_error = kind
    ex.status = 502
    ex.ctx.metrics.upstream_errors.labels(kind).inc()


async def _translate_stream(
    ex: Exchange,
    upstream: UpstreamResponse,
    send: Send,
    translator: EventTranslator,
    keep: list[bytes] | None,
    keepalive_seconds: float,
) -> None:
    pending = b""
    async for data in lines_or_silence(aiter(upstream.chunks()), keepalive_seconds):
        if data is None:
            await send_body(send, translator.ping())
            continue
        if keep is not None:
            keep.append(data)
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        out = b"".join([translator.feed_line(line) for line in lines])
        if out:
            await send_body(send, out)
            if ex.ttfb_ms is None:
                ex.mark_first_byte()
    if pending.strip():
        await send_body(send, translator.feed_line(pending))


async def relay_events(
    ex: Exchange,
    upstream: UpstreamResponse,
    receive: Receive,
    send: Send,
    translator: EventTranslator,
    *,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
) -> None:
    """Translate Ollama's NDJSON into the surface's events as each line completes."""
    watch = watch_client(ex, receive, upstream)
    keep: list[bytes] | None = [] if ex.identity.log_prompts else None
    await start_response(send, 200, ex.headers(_SSE))
    ex.status = 200
    ex.responded = True
    ex.streamed = True
    await send_body(send, translator.opening())
    try:
        await _translate_stream(ex, upstream, send, translator, keep, keepalive_seconds)
        if watch.left:
            pass
        elif ex.revoked:
            ended_by_revocation(ex)
            await send_body(send, translator.fail(REVOKED_MESSAGE))
        elif not translator.finished:
            _midstream_failure(ex, "truncated")
            await send_body(send, translator.fail("the model server closed the stream early"))
        elif translator.failed:
            _midstream_failure(ex, "midstream")
    except (msgspec.DecodeError, msgspec.ValidationError):
        upstream.abort()
        _midstream_failure(ex, "unreadable")
        await send_body(send, translator.fail("the model server sent an unreadable stream"))
    except UpstreamError as exc:
        if ex.revoked:
            ended_by_revocation(ex)
            with contextlib.suppress(Exception):
                await send_body(send, translator.fail(REVOKED_MESSAGE))
        elif not watch.left:
            _midstream_failure(ex, "timeout" if isinstance(exc, UpstreamTimeout) else "midstream")
            with contextlib.suppress(Exception):
                await send_body(send, translator.fail("the model server stream broke off"))
    finally:
        upstream.abort()  # a no-op after a complete body; else Ollama must see the cancel
        await watch.close()
        ex.disconnected = watch.left
        if translator.completion_tokens is not None and translator.prompt_tokens is not None:
            ex.charge(translator.prompt_tokens, translator.completion_tokens)
        else:
            ex.charge_estimate(translator.content_chunks)
    if keep is not None:
        ex.response_text = response_text(b"".join(keep))
    if not watch.left:
        await end_body(send)
