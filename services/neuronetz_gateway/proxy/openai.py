"""The OpenAI ``/v1/*`` surface, translated to and from Ollama's native API.

Translation lives in :mod:`neuronetz_gateway.domain.openai_compat`; this
module checks the model, applies the key's caps to the translated request,
reserves, forwards and shapes the answer (SSE when streaming).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec

from neuronetz_gateway.domain.accounting import (
    capped_num_predict,
    estimate_prompt_tokens,
    plan_output,
    token_room,
)
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.domain.openai_compat import (
    ChatStreamTranslator,
    CompletionStreamTranslator,
    OllamaChatRequest,
    OllamaChunk,
    OllamaGenerateRequest,
    OllamaOptions,
    TranslationError,
    chat_completion_body,
    completion_body,
    decode_ollama_chunk,
    decode_ollama_embed,
    embeddings_body,
    encode_ollama_request,
    model_body,
    models_list_body,
    translate_chat_request,
    translate_completion_request,
    translate_embeddings_request,
    translation_error_body,
)
from neuronetz_gateway.domain.options import output_limit
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.native import read_request_body
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.relay import forward, read_whole, relay_sse, upstream_refusal

__all__ = ["chat_completions", "completions", "embeddings", "model", "models"]

_JSON = b"application/json"
_T = TypeVar("_T")
_encoder = msgspec.json.Encoder()


def _translate(translate: Callable[[bytes], _T], body: bytes) -> _T:
    try:
        return translate(body)
    except TranslationError as exc:
        raise Refusal(
            400,
            exc.code or "invalid_request_error",
            exc.message,
            param=exc.param,
            body=translation_error_body(exc),
        ) from None


def _cap(ex: Exchange, request: OllamaChatRequest | OllamaGenerateRequest) -> int | None:
    """Clamp ``num_predict`` (max_tokens) to the key's cap; return the output bound.

    ``max_tokens`` is at least 1 (the translation refuses 0); one larger than
    any bound (:data:`MAX_OUTPUT_TOKENS`) is unbounded, as Ollama would read it.
    """
    options = request.options
    requested = options.num_predict if options is not None else None
    capped = capped_num_predict(
        output_limit("max_tokens", requested), ex.identity.caps.max_num_predict
    )
    if capped != requested:
        if options is None:
            request.options = OllamaOptions(num_predict=capped)
        else:
            options.num_predict = capped
    return capped


def _reservation(
    ex: Exchange,
    request: OllamaChatRequest | OllamaGenerateRequest,
    estimate: int,
    output: int | None,
) -> int:
    """Tokens to reserve; without a client cap, the planned one is forwarded as num_predict."""
    plan = plan_output(
        output, ex.ctx.settings.default_max_tokens, estimate, token_room(ex.identity.allowance)
    )
    if plan.forward_cap:
        if request.options is None:
            request.options = OllamaOptions(num_predict=plan.output)
        else:
            request.options.num_predict = plan.output
    return estimate + plan.output


async def chat_completions(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/chat/completions`` -> ``/api/chat``."""
    raw = await read_request_body(ex, scope, receive)
    translation = _translate(translate_chat_request, raw)
    request = translation.ollama
    await ex.check_model(request.model)
    output = _cap(ex, request)
    texts = [m.content for m in request.messages]
    if request.tools:
        texts.append(_encoder.encode(request.tools).decode())
    images = sum(len(m.images or ()) for m in request.messages)
    estimate = estimate_prompt_tokens(texts, messages=len(request.messages), images=images)
    await _generate(
        ex, receive, send, raw, request, estimate, output,
        upstream_path="/api/chat",
        translator=lambda: ChatStreamTranslator(
            ex.identity.request_id, request.model, include_usage=translation.include_usage
        ),
        body_of=chat_completion_body,
        text_of=lambda chunk: (chunk.message.content if chunk.message else "") or "",
    )  # fmt: skip


async def completions(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/completions`` -> ``/api/generate``."""
    raw = await read_request_body(ex, scope, receive)
    translation = _translate(translate_completion_request, raw)
    request = translation.ollama
    await ex.check_model(request.model)
    output = _cap(ex, request)
    estimate = estimate_prompt_tokens([request.prompt, request.suffix or ""])
    await _generate(
        ex, receive, send, raw, request, estimate, output,
        upstream_path="/api/generate",
        translator=lambda: CompletionStreamTranslator(
            ex.identity.request_id, request.model, include_usage=translation.include_usage
        ),
        body_of=completion_body,
        text_of=lambda chunk: chunk.response or "",
    )  # fmt: skip


async def _generate(
    ex: Exchange,
    receive: Receive,
    send: Send,
    raw: bytes,
    request: OllamaChatRequest | OllamaGenerateRequest,
    estimate: int,
    output: int | None,
    *,
    upstream_path: str,
    translator: Callable[[], ChatStreamTranslator | CompletionStreamTranslator],
    body_of: Callable[..., bytes],
    text_of: Callable[[OllamaChunk], str],
) -> None:
    """Reserve, forward, and answer as a stream (SSE) or one translated body."""
    await ex.reserve(estimate, _reservation(ex, request, estimate, output))
    if ex.identity.log_prompts:
        ex.prompt_text = raw.decode("utf-8", "replace")
    upstream = await forward(ex, upstream_path, encode_ollama_request(request))
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    if request.stream:
        await relay_sse(ex, upstream, receive, send, translator())
        return
    data = await read_whole(ex, upstream, receive)
    chunk = decode_ollama_chunk(data)
    ex.charge(chunk.prompt_eval_count or 0, chunk.eval_count or 0)
    if ex.identity.log_prompts:
        ex.response_text = text_of(chunk)
    await ex.settle()
    body = body_of(chunk, request_id=ex.identity.request_id, model=request.model)
    await ex.respond(send, 200, body, _JSON)


async def embeddings(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/embeddings`` -> ``/api/embed``."""
    raw = await read_request_body(ex, scope, receive)
    translation = _translate(translate_embeddings_request, raw)
    request = translation.ollama
    await ex.check_model(request.model)
    inputs = [request.input] if isinstance(request.input, str) else request.input
    estimate = estimate_prompt_tokens(inputs, messages=len(inputs))
    await ex.reserve(estimate, estimate)
    if ex.identity.log_prompts:
        ex.prompt_text = raw.decode("utf-8", "replace")
    upstream = await forward(ex, "/api/embed", encode_ollama_request(request))
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    data = await read_whole(ex, upstream, receive)
    response = decode_ollama_embed(data)
    if response.prompt_eval_count is not None:
        ex.charge(response.prompt_eval_count, 0)
    else:
        ex.charge_estimate(0)
    await ex.settle()
    body = embeddings_body(
        response, model=request.model, encoding_format=translation.encoding_format
    )
    await ex.respond(send, 200, body, _JSON)


async def models(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/models``: the installed models this key may use."""
    catalogue = await ex.catalogue()
    effective = catalogue.effective(ex.identity.models)
    entries = [catalogue.openai_entry(name) for name in catalogue.entries if name in effective]
    await ex.respond(send, 200, models_list_body(entries), _JSON)


async def model(ex: Exchange, scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
    """``GET /v1/models/{model}``: one model, or 404 for anything outside the key's set."""
    ex.model = model_id[:200]
    canonical = canonical_model(model_id)
    catalogue = await ex.catalogue()
    if not canonical or canonical not in catalogue.effective(ex.identity.models):
        raise Refusal(404, "not_found", f"The model '{model_id}' does not exist", param="model")
    ex.canonical = canonical
    await ex.respond(send, 200, model_body(catalogue.openai_entry(canonical)), _JSON)
