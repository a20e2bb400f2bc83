"""One model request, whatever its surface: the steps, in order, once.

Every model route (``/api/generate``, ``/api/chat``, ``/api/embed``,
``/api/embeddings``, ``/api/show``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``,
``/v1/messages``) runs :func:`run_model_call` with its surface's
:class:`Codec`. The story, top to bottom:

1. **decode**: the body (413 past ``NZ_MAX_BODY_BYTES``) becomes the
   surface's native Ollama request (the codec; a 400 in its dialect);
2. **model and caps**: the model must be allowed and installed (one answer
   for both: :meth:`Exchange.check_model`), then the key's caps are applied;
3. **token plan**: prompt estimate plus the output bound (the client's, or
   the default shrunk to the room left, then sent on as ``num_predict``);
4. **reserve**: both levels' budgets and TPM, and the identity used up (429/503);
5. **forward**: to the route's fixed upstream path through the
   :class:`~neuronetz_gateway.proxy.ports.Upstream` port (502/504); a
   stream queued for a backend's slot longer than ``NZ_QUEUE_PING_SECONDS``
   has its response started and gets the surface's keep-alive frame meanwhile
   (:class:`~neuronetz_gateway.proxy.relay.QueueWait`; none on native), and
   a refusal after that start is the surface's in-stream error;
6. **relay**: a stream through the codec's frames as it arrives, or one
   answer translated whole;
7. **charge and settle**: Ollama's counts (or the estimate for a cut-off
   answer), the reservation corrected, the lease released;
8. **audit**: :meth:`Exchange.finish`, run by ``routes.serve`` whatever happened.

A surface is a codec (:class:`Codec`): decode, caps, estimate, encode, and
its frames and whole-answer translation. Adding a surface is a codec and a
route row (``proxy/routes.py``), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from neuronetz_gateway.domain.accounting import capped_num_predict, plan_output, token_room
from neuronetz_gateway.domain.identity import OptionCaps
from neuronetz_gateway.domain.options import KeepAliveWindow, output_limit
from neuronetz_gateway.proxy.asgi import BodyTooLarge, Receive, Scope, Send, read_body
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.refusals import ClientLeft, Refusal
from neuronetz_gateway.proxy.relay import (
    QueueWait,
    StreamFrames,
    forward,
    read_whole,
    refuse_in_stream,
    relay_stream,
    upstream_refusal,
)

__all__ = [
    "Answer",
    "Codec",
    "TokenPlan",
    "UnreadableAnswer",
    "capped_output",
    "read_request_body",
    "run_model_call",
]

R = TypeVar("R")

#: What a call reserves: prompt and output, the prompt only (embeddings), nothing (show).
TokenPlan = Literal["output", "prompt", "none"]


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole (non-streamed) answer in the surface's words, and what it cost.

    ``counts``: Ollama's ``(prompt, completion)``; ``None`` when it sent none
    (the prompt estimate is charged). ``text``: for opted-in prompt logs only.
    """

    body: bytes
    content_type: bytes
    counts: tuple[int, int] | None
    text: str | None = None


class UnreadableAnswer(Exception):
    """Ollama's whole answer could not be used (``kind``: ``unreadable`` or ``midstream``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Codec(Protocol[R]):
    """A surface: its requests decoded into Ollama's, Ollama's answers into its own.

    ``R`` is the decoded request (the native body, or a translation holding
    the Ollama request); the pipeline calls the methods in the order listed.
    """

    upstream_path: str
    tokens: TokenPlan

    def decode(self, raw: bytes) -> R:
        """The request, or a :class:`Refusal` (400) in the surface's dialect."""
        ...

    def model(self, request: R) -> str:
        """The model the client asked for, as written."""
        ...

    def cap(self, request: R, caps: OptionCaps, window: KeepAliveWindow) -> int | None:
        """Apply the key's caps; the output bound the client asked for (``None``: none)."""
        ...

    def estimate(self, request: R) -> int:
        """The prompt estimate (tokens)."""
        ...

    def set_output(self, request: R, tokens: int) -> None:
        """Send ``tokens`` as the request's own output cap (``num_predict``)."""
        ...

    def encode(self, request: R) -> bytes:
        """The body Ollama receives."""
        ...

    def stream_asked(self, request: R) -> bool:
        """Whether the client asked for a stream (a hint for the upstream's choice)."""
        ...

    def session(self, request: R) -> str | None:
        """A session hint in the body (OpenAI's ``prompt_cache_key`` / ``user``), if any."""
        ...

    def streams(self, request: R, content_type: str) -> bool:
        """Whether the answer (with the upstream's ``content_type``) is relayed as a stream."""
        ...

    def frames(self, request: R, request_id: str, estimate: int) -> StreamFrames:
        """The surface's frames for one streamed answer."""
        ...

    def answer(
        self, request: R, data: bytes, content_type: str, request_id: str, *, keep_text: bool
    ) -> Answer:
        """A whole answer translated (raises :class:`UnreadableAnswer`)."""
        ...


def capped_output(requested: int | None, caps: OptionCaps) -> int | None:
    """A client's ``num_predict`` / ``max_tokens`` clamped to the key's cap (never refused).

    Read as Ollama reads it first: one past any bound is unbounded
    (:func:`~neuronetz_gateway.domain.options.output_limit`).
    """
    return capped_num_predict(output_limit("max_tokens", requested), caps.max_num_predict)


async def read_request_body(ex: Exchange, scope: Scope, receive: Receive) -> bytes:
    """The request body within ``max_body_bytes`` (413 past it)."""
    limit = ex.ctx.settings.max_body_bytes
    try:
        body = await read_body(scope, receive, limit)
    except BodyTooLarge:
        raise Refusal(413, "request_too_large", f"the request body exceeds {limit} bytes") from None
    if body is None:
        raise ClientLeft
    return body


def _plan_tokens(
    ex: Exchange, codec: Codec[R], request: R, estimate: int, output: int | None
) -> int:
    """Tokens to reserve; a planned output bound is sent on as the request's cap."""
    if codec.tokens == "none":
        return 0
    if codec.tokens == "prompt":
        return estimate
    plan = plan_output(
        output, ex.ctx.settings.default_max_tokens, estimate, token_room(ex.identity.allowance)
    )
    if plan.forward_cap:
        codec.set_output(request, plan.output)
    return estimate + plan.output


async def run_model_call(
    codec: Codec[R], ex: Exchange, scope: Scope, receive: Receive, send: Send
) -> None:
    """One model request through every step (see the module's docstring)."""
    # 1. decode
    raw = await read_request_body(ex, scope, receive)
    request = codec.decode(raw)
    # 2. model and caps
    await ex.check_model(codec.model(request))
    settings = ex.ctx.settings
    window = KeepAliveWindow(settings.keep_alive_min_seconds, settings.keep_alive_max_seconds)
    output = codec.cap(request, ex.identity.caps, window)
    # 3. token plan
    estimate = codec.estimate(request)
    tokens = _plan_tokens(ex, codec, request, estimate, output)
    # 4. reserve
    await ex.reserve(estimate, tokens)
    log_prompts = ex.identity.log_prompts
    if log_prompts:
        ex.prompt_text = raw.decode("utf-8", "replace")
    # 5. forward (a session header wins over one named in the body)
    if ex.session is None:
        ex.session = codec.session(request)
    body = codec.encode(request)
    stream = codec.stream_asked(request)
    # should it wait for a slot: the client watched, a stream kept posted meanwhile
    frames = codec.frames(request, ex.identity.request_id, estimate) if stream else None
    waiting = QueueWait(ex, receive, send, frames, settings.queue_ping_seconds)
    try:
        upstream = await forward(ex, codec.upstream_path, body, stream=stream, waiting=waiting)
        if upstream.status != 200:
            raise await upstream_refusal(ex, upstream)
    except Refusal as refusal:
        if frames is None or not ex.responded:
            raise
        await refuse_in_stream(ex, send, frames, refusal)  # started while it waited
        return
    # 6. relay (a stream is charged and settled as it ends, then audited)
    content_type = upstream.content_type
    if ex.responded or codec.streams(request, content_type):
        if frames is None:
            frames = codec.frames(request, ex.identity.request_id, estimate)
        await relay_stream(ex, upstream, receive, send, frames)
        return
    data = await read_whole(ex, upstream, receive)
    try:
        answer = codec.answer(
            request, data, content_type, ex.identity.request_id, keep_text=log_prompts
        )
    except UnreadableAnswer as exc:
        ex.upstream_error = exc.kind
        ex.charge_estimate(0)
        raise Refusal(502, "upstream_error", exc.message) from None
    # 7. charge and settle (before the answer, so its headers are exact)
    if answer.counts is not None:
        ex.charge(*answer.counts)
    else:
        ex.charge_estimate(0)
    if log_prompts:
        ex.response_text = answer.text
    await ex.settle()
    await ex.respond(send, 200, answer.body, answer.content_type)
    # 8. audit: routes.serve runs ex.finish() once this returns or raises
