"""The OpenAI ``/v1/*`` surface: its codecs, and the model listings.

Translation lives in :mod:`neuronetz_gateway.domain.openai_compat`; each
codec here hands the pipeline (:mod:`neuronetz_gateway.proxy.pipeline`) the
translated request, its caps and estimate, and turns Ollama's answer back
into OpenAI's (SSE chunks when streaming).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import msgspec

from neuronetz_gateway.domain.accounting import estimate_prompt_tokens
from neuronetz_gateway.domain.identity import OptionCaps
from neuronetz_gateway.domain.openai_compat import (
    ChatRequestTranslation,
    ChatStreamTranslator,
    CompletionRequestTranslation,
    CompletionStreamTranslator,
    EmbeddingsRequestTranslation,
    OllamaChatRequest,
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
from neuronetz_gateway.domain.options import KeepAliveWindow
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.pipeline import Answer, TokenPlan, capped_output
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.relay import TranslatedFrames

__all__ = ["ChatCodec", "CompletionCodec", "EmbeddingsCodec", "model", "models"]

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


def _set_num_predict(
    request: OllamaChatRequest | OllamaGenerateRequest, tokens: int | None
) -> None:
    if request.options is None:
        request.options = OllamaOptions(num_predict=tokens)
    else:
        request.options.num_predict = tokens


def _cap(request: OllamaChatRequest | OllamaGenerateRequest, caps: OptionCaps) -> int | None:
    """Clamp ``num_predict`` (max_tokens, at least 1 by the translation) to the key's cap."""
    requested = request.options.num_predict if request.options is not None else None
    capped = capped_output(requested, caps)
    if capped != requested:
        _set_num_predict(request, capped)
    return capped


class _Translated(Protocol):
    """A translation holding the Ollama request (chat or generate) and its session hint."""

    @property
    def ollama(self) -> OllamaChatRequest | OllamaGenerateRequest: ...

    @property
    def session(self) -> str | None: ...


_R = TypeVar("_R", bound=_Translated)


class _OllamaRequestCodec(Generic[_R]):
    """What chat and completions share: the thin methods over the Ollama request.

    ``_R`` is the translation; a subclass says how to decode, estimate, stream
    and answer.
    """

    tokens: TokenPlan = "output"

    def model(self, request: _R) -> str:
        return request.ollama.model

    def cap(self, request: _R, caps: OptionCaps, window: KeepAliveWindow) -> int | None:
        return _cap(request.ollama, caps)

    def set_output(self, request: _R, tokens: int) -> None:
        _set_num_predict(request.ollama, tokens)

    def encode(self, request: _R) -> bytes:
        return encode_ollama_request(request.ollama)

    def stream_asked(self, request: _R) -> bool:
        return request.ollama.stream

    def session(self, request: _R) -> str | None:
        return request.session

    def streams(self, request: _R, content_type: str) -> bool:
        return request.ollama.stream


class ChatCodec(_OllamaRequestCodec[ChatRequestTranslation]):
    """``POST /v1/chat/completions`` -> ``/api/chat``; SSE chunks when streaming."""

    upstream_path = "/api/chat"

    def decode(self, raw: bytes) -> ChatRequestTranslation:
        return _translate(translate_chat_request, raw)

    def estimate(self, request: ChatRequestTranslation) -> int:
        messages = request.ollama.messages
        texts = [m.content for m in messages]
        if request.ollama.tools:
            texts.append(_encoder.encode(request.ollama.tools).decode())
        images = sum(len(m.images or ()) for m in messages)
        return estimate_prompt_tokens(texts, messages=len(messages), images=images)

    def frames(
        self, request: ChatRequestTranslation, request_id: str, estimate: int
    ) -> TranslatedFrames:
        translator = ChatStreamTranslator(
            request_id, request.ollama.model, include_usage=request.include_usage
        )
        return TranslatedFrames(translator)

    def answer(
        self,
        request: ChatRequestTranslation,
        data: bytes,
        content_type: str,
        request_id: str,
        *,
        keep_text: bool,
    ) -> Answer:
        chunk = decode_ollama_chunk(data)
        text = ((chunk.message.content if chunk.message else "") or "") if keep_text else None
        body = chat_completion_body(chunk, request_id=request_id, model=request.ollama.model)
        return Answer(body, _JSON, (chunk.prompt_eval_count or 0, chunk.eval_count or 0), text)


class CompletionCodec(_OllamaRequestCodec[CompletionRequestTranslation]):
    """``POST /v1/completions`` -> ``/api/generate``."""

    upstream_path = "/api/generate"

    def decode(self, raw: bytes) -> CompletionRequestTranslation:
        return _translate(translate_completion_request, raw)

    def estimate(self, request: CompletionRequestTranslation) -> int:
        return estimate_prompt_tokens([request.ollama.prompt, request.ollama.suffix or ""])

    def frames(
        self, request: CompletionRequestTranslation, request_id: str, estimate: int
    ) -> TranslatedFrames:
        translator = CompletionStreamTranslator(
            request_id, request.ollama.model, include_usage=request.include_usage
        )
        return TranslatedFrames(translator)

    def answer(
        self,
        request: CompletionRequestTranslation,
        data: bytes,
        content_type: str,
        request_id: str,
        *,
        keep_text: bool,
    ) -> Answer:
        chunk = decode_ollama_chunk(data)
        text = (chunk.response or "") if keep_text else None
        body = completion_body(chunk, request_id=request_id, model=request.ollama.model)
        return Answer(body, _JSON, (chunk.prompt_eval_count or 0, chunk.eval_count or 0), text)


class EmbeddingsCodec:
    """``POST /v1/embeddings`` -> ``/api/embed``; the prompt is all it costs."""

    upstream_path = "/api/embed"
    tokens: TokenPlan = "prompt"

    def decode(self, raw: bytes) -> EmbeddingsRequestTranslation:
        return _translate(translate_embeddings_request, raw)

    def model(self, request: EmbeddingsRequestTranslation) -> str:
        return request.ollama.model

    def cap(
        self, request: EmbeddingsRequestTranslation, caps: OptionCaps, window: KeepAliveWindow
    ) -> int | None:
        return None  # no output to cap

    def estimate(self, request: EmbeddingsRequestTranslation) -> int:
        value = request.ollama.input
        inputs = [value] if isinstance(value, str) else value
        return estimate_prompt_tokens(inputs, messages=len(inputs))

    def set_output(self, request: EmbeddingsRequestTranslation, tokens: int) -> None:
        return None  # never called: embeddings plan no output

    def encode(self, request: EmbeddingsRequestTranslation) -> bytes:
        return encode_ollama_request(request.ollama)

    def stream_asked(self, request: EmbeddingsRequestTranslation) -> bool:
        return False

    def session(self, request: EmbeddingsRequestTranslation) -> None:
        return None

    def streams(self, request: EmbeddingsRequestTranslation, content_type: str) -> bool:
        return False

    def frames(
        self, request: EmbeddingsRequestTranslation, request_id: str, estimate: int
    ) -> TranslatedFrames:
        raise NotImplementedError("embeddings are never streamed")

    def answer(
        self,
        request: EmbeddingsRequestTranslation,
        data: bytes,
        content_type: str,
        request_id: str,
        *,
        keep_text: bool,
    ) -> Answer:
        response = decode_ollama_embed(data)
        counts = None if response.prompt_eval_count is None else (response.prompt_eval_count, 0)
        body = embeddings_body(
            response, model=request.ollama.model, encoding_format=request.encoding_format
        )
        return Answer(body, _JSON, counts)


async def models(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/models``: the installed models this key may use."""
    catalogue = await ex.catalogue()
    effective = catalogue.effective(ex.identity.models)
    entries = [catalogue.openai_entry(name) for name in catalogue.entries if name in effective]
    await ex.respond(send, 200, models_list_body(entries), _JSON)


async def model(ex: Exchange, scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
    """``GET /v1/models/{model}``: one model, or OpenAI's 404 ``model_not_found`` for
    anything outside the key's set (the same body as a model call's, missing or not allowed)."""
    canonical = await ex.check_model(model_id)  # the model call's check, and its 404
    catalogue = await ex.catalogue()
    await ex.respond(send, 200, model_body(catalogue.openai_entry(canonical)), _JSON)
