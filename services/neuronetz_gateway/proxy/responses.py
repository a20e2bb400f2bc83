"""The OpenAI Responses surface (``/v1/responses``, stateless), translated to ``/api/chat``.

Translation lives in :mod:`neuronetz_gateway.domain.responses_compat`; the
steps (caps, reservation, relay, accounting) in
:mod:`neuronetz_gateway.proxy.pipeline`. Refusals use OpenAI's error
object (the exchange's surface is ``openai``).
"""

from __future__ import annotations

from neuronetz_gateway.domain.ollama_chat import ChatChunk
from neuronetz_gateway.domain.responses_compat import (
    ResponsesTranslation,
    ResponseStreamTranslator,
    response_body,
    translate_responses_request,
)
from neuronetz_gateway.proxy.agent_codec import AgentCodec
from neuronetz_gateway.proxy.relay import EventFrames

__all__ = ["ResponsesCodec"]


class ResponsesCodec(AgentCodec[ResponsesTranslation]):
    """``POST /v1/responses`` -> ``/api/chat``."""

    def translate(self, raw: bytes) -> ResponsesTranslation:
        return translate_responses_request(raw)

    def events(self, request: ResponsesTranslation, request_id: str, estimate: int) -> EventFrames:
        translator = ResponseStreamTranslator(
            f"resp_{request_id}", request.ollama.model, request.echo
        )
        return EventFrames(translator)

    def body(self, request: ResponsesTranslation, chunk: ChatChunk, request_id: str) -> bytes:
        return response_body(
            chunk, response_id=f"resp_{request_id}", model=request.ollama.model, echo=request.echo
        )
