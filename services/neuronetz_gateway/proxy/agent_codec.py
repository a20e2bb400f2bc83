"""What the agent surfaces' codecs share (Anthropic Messages, OpenAI Responses).

Both translate their request into one Ollama ``/api/chat`` call
(:class:`~neuronetz_gateway.domain.ollama_chat.ChatRequest`, the
translation's ``ollama``) and stream events with an opening and keep-alives
(:class:`~neuronetz_gateway.proxy.relay.EventFrames`: Anthropic's ``ping``
while the model is slow, so that clients and intermediaries do not give up on
a quiet connection). A subclass says how to decode, which events to stream
and how a whole answer reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import msgspec

from neuronetz_gateway.domain.accounting import response_text
from neuronetz_gateway.domain.identity import OptionCaps
from neuronetz_gateway.domain.ollama_chat import (
    ChatChunk,
    ChatOptions,
    ChatRequest,
    SurfaceError,
    decode_chat_chunk,
    encode_chat_request,
    estimate_chat_prompt,
)
from neuronetz_gateway.domain.options import KeepAliveWindow
from neuronetz_gateway.proxy.pipeline import Answer, TokenPlan, UnreadableAnswer, capped_output
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.relay import EventFrames

__all__ = ["AgentCodec", "refuse_input"]

_JSON = b"application/json"


class _HasChat(Protocol):
    @property
    def ollama(self) -> ChatRequest: ...


T = TypeVar("T", bound=_HasChat)


def refuse_input(exc: SurfaceError, body: Callable[[str], bytes] | None = None) -> Refusal:
    """A 400 for a request the surface cannot translate (``body``: in the dialect)."""
    return Refusal(
        400,
        "invalid_request_error",
        exc.message,
        param=exc.param,
        body=body(exc.message) if body is not None else None,
    )


def _set_num_predict(request: ChatRequest, tokens: int | None) -> None:
    if request.options is None:
        request.options = ChatOptions(num_predict=tokens)
    else:
        request.options.num_predict = tokens


class AgentCodec(Generic[T]):
    """A surface translated into one ``/api/chat`` call (``T``: its translation)."""

    upstream_path = "/api/chat"
    tokens: TokenPlan = "output"

    def translate(self, raw: bytes) -> T:
        """The surface's translation (raises :class:`SurfaceError`)."""
        raise NotImplementedError

    def events(self, request: T, request_id: str, estimate: int) -> EventFrames:
        """The event frames of one streamed answer."""
        raise NotImplementedError

    def body(self, request: T, chunk: ChatChunk, request_id: str) -> bytes:
        """A whole answer in the surface's words."""
        raise NotImplementedError

    def decode(self, raw: bytes) -> T:
        try:
            return self.translate(raw)
        except SurfaceError as exc:
            raise refuse_input(exc) from None

    def model(self, request: T) -> str:
        return request.ollama.model

    def cap(self, request: T, caps: OptionCaps, window: KeepAliveWindow) -> int | None:
        chat = request.ollama
        requested = chat.options.num_predict if chat.options is not None else None
        capped = capped_output(requested, caps)
        if capped != requested:
            _set_num_predict(chat, capped)
        return capped

    def estimate(self, request: T) -> int:
        return estimate_chat_prompt(request.ollama)

    def set_output(self, request: T, tokens: int) -> None:
        _set_num_predict(request.ollama, tokens)

    def encode(self, request: T) -> bytes:
        return encode_chat_request(request.ollama)

    def stream_asked(self, request: T) -> bool:
        return bool(request.ollama.stream)

    def session(self, request: T) -> None:
        return None  # the agents name their session in a header

    def streams(self, request: T, content_type: str) -> bool:
        return bool(request.ollama.stream)

    def frames(self, request: T, request_id: str, estimate: int) -> EventFrames:
        return self.events(request, request_id, estimate)

    def answer(
        self, request: T, data: bytes, content_type: str, request_id: str, *, keep_text: bool
    ) -> Answer:
        try:
            chunk = decode_chat_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise UnreadableAnswer(
                "unreadable", "the model server sent an unreadable answer"
            ) from None
        if chunk.error is not None:
            raise UnreadableAnswer("midstream", chunk.error)
        counts = (chunk.prompt_eval_count or 0, chunk.eval_count or 0)
        text = response_text(data) if keep_text else None
        return Answer(self.body(request, chunk, request_id), _JSON, counts, text)
