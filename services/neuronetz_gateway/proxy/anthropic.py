"""The Anthropic Messages surface (``/v1/messages``), translated to Ollama's ``/api/chat``.

Translation lives in :mod:`neuronetz_gateway.domain.anthropic_compat`; the
pipeline (caps, reservation, relay, accounting) in
:mod:`neuronetz_gateway.proxy.agent_relay`. Every refusal on this surface is
rendered in Anthropic's error shape (the exchange's surface is
``anthropic``).
"""

from __future__ import annotations

from neuronetz_gateway.domain.anthropic_compat import (
    MessageStreamTranslator,
    count_tokens_body,
    message_body,
    translate_count_tokens_request,
    translate_messages_request,
)
from neuronetz_gateway.domain.ollama_chat import SurfaceError, estimate_chat_prompt
from neuronetz_gateway.proxy.agent_relay import refuse_input, run_chat
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.native import read_request_body

__all__ = ["count_tokens", "messages"]

_JSON = b"application/json"


async def messages(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/messages`` -> ``/api/chat``."""
    raw = await read_request_body(ex, scope, receive)
    try:
        request = translate_messages_request(raw).ollama
    except SurfaceError as exc:
        raise refuse_input(exc) from None
    await ex.check_model(request.model)  # 404 on this surface, missing or not allowed
    message_id = f"msg_{ex.identity.request_id}"
    model = request.model
    await run_chat(
        ex,
        receive,
        send,
        raw,
        request,
        translator=lambda estimate: MessageStreamTranslator(message_id, model, estimate),
        body_of=lambda chunk: message_body(chunk, message_id=message_id, model=model),
    )


async def count_tokens(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/messages/count_tokens``: the gateway's prompt estimate (nothing is charged)."""
    raw = await read_request_body(ex, scope, receive)
    try:
        request = translate_count_tokens_request(raw)
    except SurfaceError as exc:
        raise refuse_input(exc) from None
    await ex.check_model(request.model)  # 404 on this surface, missing or not allowed
    await ex.respond(send, 200, count_tokens_body(estimate_chat_prompt(request)), _JSON)
