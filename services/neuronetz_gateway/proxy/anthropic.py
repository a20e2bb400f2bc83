"""The Anthropic Messages surface (``/v1/messages``), translated to Ollama's ``/api/chat``.

Translation lives in :mod:`neuronetz_gateway.domain.anthropic_compat`; the
steps (caps, reservation, relay, accounting) in
:mod:`neuronetz_gateway.proxy.pipeline`. Every refusal on this surface is
rendered in Anthropic's error shape (the exchange's surface is
``anthropic``).
"""

from __future__ import annotations

from neuronetz_gateway.domain.anthropic_compat import (
    MessagesTranslation,
    MessageStreamTranslator,
    count_tokens_body,
    message_body,
    translate_count_tokens_request,
    translate_messages_request,
)
from neuronetz_gateway.domain.ollama_chat import ChatChunk, SurfaceError, estimate_chat_prompt
from neuronetz_gateway.proxy.agent_codec import AgentCodec, refuse_input
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.pipeline import read_request_body
from neuronetz_gateway.proxy.relay import EventFrames

__all__ = ["MessagesCodec", "count_tokens"]

_JSON = b"application/json"


class MessagesCodec(AgentCodec[MessagesTranslation]):
    """``POST /v1/messages`` -> ``/api/chat`` (404 for a model missing or not allowed)."""

    def translate(self, raw: bytes) -> MessagesTranslation:
        return translate_messages_request(raw)

    def events(self, request: MessagesTranslation, request_id: str, estimate: int) -> EventFrames:
        model = request.ollama.model
        return EventFrames(MessageStreamTranslator(f"msg_{request_id}", model, estimate))

    def body(self, request: MessagesTranslation, chunk: ChatChunk, request_id: str) -> bytes:
        return message_body(chunk, message_id=f"msg_{request_id}", model=request.ollama.model)


async def count_tokens(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/messages/count_tokens``: the gateway's prompt estimate (nothing is charged)."""
    raw = await read_request_body(ex, scope, receive)
    try:
        request = translate_count_tokens_request(raw)
    except SurfaceError as exc:
        raise refuse_input(exc) from None
    await ex.check_model(request.model)  # 404 on this surface, missing or not allowed
    await ex.respond(send, 200, count_tokens_body(estimate_chat_prompt(request)), _JSON)
