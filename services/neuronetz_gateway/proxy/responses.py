"""The OpenAI Responses surface (``/v1/responses``, stateless), translated to ``/api/chat``.

Translation lives in :mod:`neuronetz_gateway.domain.responses_compat`; the
pipeline (caps, reservation, relay, accounting) in
:mod:`neuronetz_gateway.proxy.agent_relay`. Refusals use OpenAI's error
object (the exchange's surface is ``openai``).
"""

from __future__ import annotations

from neuronetz_gateway.domain.ollama_chat import SurfaceError
from neuronetz_gateway.domain.responses_compat import (
    ResponseStreamTranslator,
    response_body,
    translate_responses_request,
)
from neuronetz_gateway.proxy.agent_relay import refuse_input, run_chat
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.native import read_request_body

__all__ = ["responses"]


async def responses(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/responses`` -> ``/api/chat``."""
    raw = await read_request_body(ex, scope, receive)
    try:
        translation = translate_responses_request(raw)
    except SurfaceError as exc:
        raise refuse_input(exc) from None
    request = translation.ollama
    await ex.check_model(request.model)  # 404 on this surface, missing or not allowed
    response_id = f"resp_{ex.identity.request_id}"
    model, echo = request.model, translation.echo
    await run_chat(
        ex,
        receive,
        send,
        raw,
        request,
        translator=lambda estimate: ResponseStreamTranslator(response_id, model, echo),
        body_of=lambda chunk: response_body(chunk, response_id=response_id, model=model, echo=echo),
    )
