"""Ollama's ``/api/chat`` as the agent surfaces (Anthropic Messages, OpenAI Responses) use it. Pure.

Both agent surfaces translate to one :class:`ChatRequest` and read Ollama's
answer as :class:`ChatChunk` lines. They need more of ``/api/chat`` than the
chat-completions translation: ``think``, ``top_k``, the ``thinking`` text of
a message, tool-call ids and ``tool_call_id`` on tool results. Ollama ignores
fields it does not know, so older servers take these bodies too.

Also here: the prompt estimate of a chat request (the reservation's input and
Anthropic's ``count_tokens``), and :class:`SurfaceError`, what a surface's
decoder raises for a request it cannot translate (400 in its dialect).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from neuronetz_gateway.domain.accounting import estimate_prompt_tokens
from neuronetz_gateway.domain.errors import InvalidInput

__all__ = [
    "ChatChunk",
    "ChatFunction",
    "ChatMessage",
    "ChatOptions",
    "ChatRequest",
    "ChatResponseMessage",
    "ChatToolCall",
    "SurfaceError",
    "decode_chat_chunk",
    "decode_request",
    "encode_chat_request",
    "estimate_chat_prompt",
]

_T = TypeVar("_T")


class SurfaceError(InvalidInput):
    """A request a surface cannot translate: 400, naming the field (``param``) when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ChatOptions(msgspec.Struct, omit_defaults=True):
    """The Ollama ``options`` the agent surfaces set."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None


class ChatFunction(msgspec.Struct):
    """A tool call's function: Ollama carries the arguments as an object."""

    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class ChatToolCall(msgspec.Struct, omit_defaults=True):
    """One tool call; ``id`` is sent by Ollama 0.12+ (absent before)."""

    function: ChatFunction
    id: str | None = None


class ChatMessage(msgspec.Struct, omit_defaults=True):
    """A message of an outgoing ``/api/chat`` body."""

    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


# ``stream`` has no default on purpose: omit_defaults would drop ``false``, and
# Ollama streams when the field is absent.
class ChatRequest(msgspec.Struct, omit_defaults=True):
    """An outgoing ``/api/chat`` body; the proxy clamps ``options`` before encoding."""

    model: str
    messages: list[ChatMessage]
    stream: bool
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    options: ChatOptions | None = None


class ChatResponseMessage(msgspec.Struct):
    """The ``message`` of a chat chunk or body (a view)."""

    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChunk(msgspec.Struct):
    """One ``/api/chat`` NDJSON line or non-streaming body (a view).

    Counts come only on the final (``done``) chunk; an ``error`` line replaces
    a chunk when Ollama fails mid-stream.
    """

    message: ChatResponseMessage | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None


_chunk_decoder = msgspec.json.Decoder(ChatChunk)
_encoder = msgspec.json.Encoder()


def decode_chat_chunk(data: bytes) -> ChatChunk:
    """One Ollama line or body (raises msgspec's errors on garbage)."""
    return _chunk_decoder.decode(data)


def encode_chat_request(request: ChatRequest) -> bytes:
    """The JSON body sent to ``/api/chat``."""
    return _encoder.encode(request)


def decode_request(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    """Decode a client body, turning msgspec's errors into :class:`SurfaceError`."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, sep, where = str(exc).partition(" - at `$")
        path = where.rstrip("`").lstrip(".") if sep else ""
        missing = "missing required field `"
        if missing in message:
            field = message.split(missing, 1)[1].rstrip("`")
            path = f"{path}.{field}" if path else field
        text = f"{message} (at '{path}')" if path else message
        raise SurfaceError(text, path or None) from None
    except UnicodeDecodeError:
        raise SurfaceError("The request body is not valid UTF-8.") from None
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: nesting deeper than any real request
        raise SurfaceError("The request body is not valid JSON.") from None


def estimate_chat_prompt(request: ChatRequest) -> int:
    """The prompt estimate of a chat request: the same estimator every surface reserves with."""
    texts: list[str] = []
    images = 0
    for message in request.messages:
        texts.append(message.content)
        if message.thinking:
            texts.append(message.thinking)
        if message.tool_calls:
            texts.extend(_encoder.encode(c.function).decode() for c in message.tool_calls)
        images += len(message.images or ())
    if request.tools:
        texts.append(_encoder.encode(request.tools).decode())
    return estimate_prompt_tokens(texts, messages=len(request.messages), images=images)
