"""OpenAI <-> Ollama translation. Pure: bytes in, Structs and bytes out.

The proxy serves the OpenAI surface by translating to Ollama's native API:

- ``POST /v1/chat/completions`` -> ``POST /api/chat``:
  :func:`translate_chat_request`, :func:`chat_completion_body`,
  :class:`ChatStreamTranslator`;
- ``POST /v1/completions`` -> ``POST /api/generate``:
  :func:`translate_completion_request`, :func:`completion_body`,
  :class:`CompletionStreamTranslator`;
- ``POST /v1/embeddings`` -> ``POST /api/embed``:
  :func:`translate_embeddings_request`, :func:`embeddings_body`;
- ``GET /v1/models[/{model}]`` <- ``GET /api/tags``: :func:`models_list_body`,
  :func:`model_body`.

A request the translation cannot express raises :class:`TranslationError`,
which the proxy answers with :func:`translation_error_body` (400, OpenAI's
error object). Upstream errors map with :func:`ollama_error_to_openai`; a
failure after the stream started is sent as :func:`error_event`.

Decoders and encoders are built once at import; the streaming hot path
(one content delta per Ollama chunk) writes from a per-stream byte template
instead of building a Struct per chunk.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import sys
import time
from array import array
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from neuronetz_gateway.domain.dialect import openai_error_body
from neuronetz_gateway.domain.errors import InvalidInput
from neuronetz_gateway.domain.stream_lines import fold_keys

__all__ = [
    "DONE_FRAME",
    "SYSTEM_FINGERPRINT",
    "ChatRequestTranslation",
    "ChatStreamTranslator",
    "CompletionRequestTranslation",
    "CompletionStreamTranslator",
    "EmbeddingsRequestTranslation",
    "OllamaChatRequest",
    "OllamaChunk",
    "OllamaEmbedRequest",
    "OllamaEmbedResponse",
    "OllamaFunctionCall",
    "OllamaGenerateRequest",
    "OllamaLogprob",
    "OllamaMessage",
    "OllamaModelEntry",
    "OllamaOptions",
    "OllamaResponseMessage",
    "OllamaTags",
    "OllamaTokenLogprob",
    "OllamaToolCall",
    "TranslationError",
    "chat_completion_body",
    "chat_logprobs",
    "completion_body",
    "decode_ollama_chunk",
    "decode_ollama_embed",
    "decode_ollama_tags",
    "embeddings_body",
    "encode_ollama_request",
    "error_event",
    "model_body",
    "models_list_body",
    "ollama_error_to_openai",
    "openai_error_body",
    "owned_by",
    "text_logprobs",
    "tool_call_id",
    "translate_chat_request",
    "translate_completion_request",
    "translate_embeddings_request",
    "translation_error_body",
]

_T = TypeVar("_T")

SYSTEM_FINGERPRINT = "fp_ollama"
DONE_FRAME = b"data: [DONE]\n\n"


class TranslationError(InvalidInput):
    """An OpenAI request the gateway cannot translate; the proxy answers 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------- Ollama side


class OllamaOptions(msgspec.Struct, omit_defaults=True):
    """The Ollama ``options`` the OpenAI surface can set."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class OllamaFunctionCall(msgspec.Struct):
    """A tool call's function: Ollama carries the arguments as an object."""

    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class OllamaToolCall(msgspec.Struct, omit_defaults=True):
    """One tool call in an Ollama message; ``id`` links it to its result (Ollama >= 0.12)."""

    function: OllamaFunctionCall
    id: str | None = None


class OllamaMessage(msgspec.Struct, omit_defaults=True):
    """A message in an outgoing ``/api/chat`` body."""

    role: str
    content: str
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None


# ``stream`` has no default on purpose: omit_defaults would drop ``false``, and
# Ollama streams when the field is absent.
class OllamaChatRequest(msgspec.Struct, omit_defaults=True):
    """An outgoing ``/api/chat`` body; the proxy may clamp ``options`` before encoding."""

    model: str
    messages: list[OllamaMessage]
    stream: bool
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    #: ``false`` turns thinking off; ``"low"``/``"medium"``/``"high"`` set its effort.
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaGenerateRequest(msgspec.Struct, omit_defaults=True):
    """An outgoing ``/api/generate`` body."""

    model: str
    prompt: str
    stream: bool
    suffix: str | None = None
    options: OllamaOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaEmbedRequest(msgspec.Struct, omit_defaults=True):
    """An outgoing ``/api/embed`` body."""

    model: str
    input: str | list[str]
    dimensions: int | None = None


class OllamaResponseMessage(msgspec.Struct):
    """The ``message`` of a chat chunk or response."""

    role: str = "assistant"
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = None
    thinking: str | None = None


class OllamaTokenLogprob(msgspec.Struct):
    """One token's log probability, as Ollama reports it."""

    token: str = ""
    logprob: float = 0.0
    bytes: list[int] | None = None


class OllamaLogprob(OllamaTokenLogprob):
    """A generated token's log probability and, when asked, the likeliest alternatives."""

    top_logprobs: list[OllamaTokenLogprob] | None = None


class OllamaChunk(msgspec.Struct):
    """One Ollama chat/generate NDJSON line or non-streaming body (a view).

    Chat fills ``message``, generate fills ``response``; the counts come only
    on the final (``done``) chunk, and an ``error`` line replaces a chunk when
    Ollama fails mid-stream.
    """

    model: str = ""
    message: OllamaResponseMessage | None = None
    response: str | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None
    logprobs: list[OllamaLogprob] | None = None


class OllamaEmbedResponse(msgspec.Struct):
    """An ``/api/embed`` response (a view)."""

    embeddings: list[list[float]]
    model: str = ""
    prompt_eval_count: int | None = None


class OllamaModelEntry(msgspec.Struct):
    """One model of ``/api/tags`` (a view)."""

    name: str
    model: str = ""
    modified_at: str = ""


class OllamaTags(msgspec.Struct):
    """An ``/api/tags`` response (a view)."""

    models: list[OllamaModelEntry] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------- OpenAI requests

_Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
_Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
_Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
#: OpenAI's range for ``top_logprobs`` (and Ollama's).
_TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]


class _ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class _TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class _ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: _ImageURL


class _AudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    """Decoded only to be refused by name: Ollama takes no audio."""

    input_audio: Any = None


class _FilePart(msgspec.Struct, tag="file", tag_field="type"):
    """Decoded only to be refused by name: Ollama takes no files."""

    file: Any = None


_Part = _TextPart | _ImagePart | _AudioPart | _FilePart


class _FunctionCallIn(msgspec.Struct):
    name: str
    # The spec says a JSON string; some clients send the object itself.
    arguments: str | dict[str, Any] = ""


class _ToolCallIn(msgspec.Struct):
    function: _FunctionCallIn
    id: str | None = None
    type: str = "function"


class _MessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCallIn] | None = None
    tool_call_id: str | None = None
    # an assistant turn's thinking, sent back in the history (Ollama's and others' names)
    reasoning: str | None = None
    reasoning_content: str | None = None


class _ToolIn(msgspec.Struct):
    type: str = "function"
    function: dict[str, Any] | None = None


class _JSONSchemaFormat(msgspec.Struct):
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


class _ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JSONSchemaFormat | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ReasoningIn(msgspec.Struct):
    effort: str | None = None


class _SamplingFields(msgspec.Struct, kw_only=True):
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: _Temperature | None = None
    top_p: _Unit | None = None
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    max_tokens: _PositiveInt | None = None
    n: int | None = None
    logit_bias: dict[str, Any] | None = None
    # not sent upstream: read as a session hint (one session, one backend)
    user: str | None = None
    prompt_cache_key: str | None = None


class _ChatRequestIn(_SamplingFields, kw_only=True):
    model: str
    messages: list[_MessageIn]
    max_completion_tokens: _PositiveInt | None = None
    tools: list[_ToolIn] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: _ResponseFormat | None = None
    reasoning_effort: str | None = None
    reasoning: _ReasoningIn | None = None
    logprobs: bool | None = None
    top_logprobs: _TopLogprobs | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None


class _CompletionRequestIn(_SamplingFields, kw_only=True):
    model: str
    # ``str | list[...]`` of several array types is not a msgspec union; checked by hand.
    prompt: str | list[Any]
    suffix: str | None = None
    echo: bool | None = None
    best_of: int | None = None
    logprobs: _TopLogprobs | None = None


class _EmbeddingsRequestIn(msgspec.Struct):
    model: str
    input: str | list[Any]
    dimensions: _PositiveInt | None = None
    encoding_format: Literal["float", "base64"] = "float"


class ChatRequestTranslation(msgspec.Struct):
    """A translated chat request and what the response side needs to know."""

    ollama: OllamaChatRequest
    include_usage: bool
    session: str | None = None  # ``prompt_cache_key`` or ``user``: a session hint


class CompletionRequestTranslation(msgspec.Struct):
    """A translated legacy completions request."""

    ollama: OllamaGenerateRequest
    include_usage: bool
    session: str | None = None  # ``prompt_cache_key`` or ``user``: a session hint


class EmbeddingsRequestTranslation(msgspec.Struct):
    """A translated embeddings request; ``encoding_format`` shapes the response."""

    ollama: OllamaEmbedRequest
    encoding_format: Literal["float", "base64"]


_MAX_SESSION_HINT = 200  # it is only hashed; as the session headers are cut
_chat_request_decoder = msgspec.json.Decoder(_ChatRequestIn)
_completion_request_decoder = msgspec.json.Decoder(_CompletionRequestIn)
_embeddings_request_decoder = msgspec.json.Decoder(_EmbeddingsRequestIn)
_arguments_decoder = msgspec.json.Decoder(dict[str, Any])
_chunk_decoder = msgspec.json.Decoder(OllamaChunk)
_embed_decoder = msgspec.json.Decoder(OllamaEmbedResponse)
_tags_decoder = msgspec.json.Decoder(OllamaTags)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _session_hint(req: _SamplingFields) -> str | None:
    """OpenAI's ``prompt_cache_key``, else ``user``: which session a request is part of."""
    for value in (req.prompt_cache_key, req.user):
        if value and value.strip():
            return value.strip()[:_MAX_SESSION_HINT]
    return None


def _decode_openai(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    """Decode an OpenAI body, turning msgspec's errors into :class:`TranslationError`."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, param = _split_validation_error(str(exc))
        raise TranslationError(message, param) from None
    except UnicodeDecodeError:
        raise TranslationError(
            "We could not parse the JSON body of your request: it is not valid UTF-8."
        ) from None
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: nesting deeper than any real request (a 100k-deep array)
        raise TranslationError(
            "We could not parse the JSON body of your request: it is not valid JSON."
        ) from None


def _split_validation_error(text: str) -> tuple[str, str | None]:
    """``"Expected `str`, got `int` - at `$.a[0].b`"`` -> (message, ``"a[0].b"``)."""
    message, sep, where = text.partition(" - at `$")
    path = where.rstrip("`").lstrip(".") if sep else ""
    missing = "missing required field `"
    if missing in message:
        field = message.split(missing, 1)[1].rstrip("`")
        path = f"{path}.{field}" if path else field
    return (f"{message} (at '{path}')" if path else message), (path or None)


def translate_chat_request(body: bytes) -> ChatRequestTranslation:
    """OpenAI ``/v1/chat/completions`` body -> Ollama ``/api/chat`` request."""
    req = _decode_openai(_chat_request_decoder, body)
    _check_sampling(req)
    if req.audio is not None or (req.modalities and "audio" in req.modalities):
        raise TranslationError(
            "Audio output is not supported.",
            "audio" if req.audio is not None else "modalities",
            "unsupported_parameter",
        )
    if not req.messages:
        raise TranslationError("'messages' must contain at least one message.", "messages")
    if req.top_logprobs and not req.logprobs:
        raise TranslationError(
            "'top_logprobs' requires 'logprobs' to be true.", "top_logprobs", "invalid_value"
        )
    options = _options(req, req.max_completion_tokens or req.max_tokens)
    return ChatRequestTranslation(
        ollama=OllamaChatRequest(
            model=req.model,
            messages=_translate_messages(req.messages),
            stream=bool(req.stream),
            tools=_chat_tools(req),
            format=_translate_format(req.response_format),
            options=options,
            think=_think(req),
            logprobs=True if req.logprobs else None,
            top_logprobs=(req.top_logprobs or None) if req.logprobs else None,
        ),
        include_usage=_include_usage(req),
        session=_session_hint(req),
    )


def _chat_tools(req: _ChatRequestIn) -> list[dict[str, Any]] | None:
    """The tools to offer. Ollama cannot force a call: ``"required"`` offers them all
    (documented as best effort), a named function offers only that one, ``"none"`` none."""
    if not req.tools:
        return None
    choice = req.tool_choice
    if choice == "none":
        return None
    tools = [_translate_tool(tool, i) for i, tool in enumerate(req.tools)]
    if choice is None or choice in ("auto", "required"):
        return tools
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        named = [t for t in tools if t["function"].get("name") == name]
        if choice.get("type") == "function" and named:
            return named
        raise TranslationError(
            "'tool_choice' must name one of the function tools in 'tools'.",
            "tool_choice",
            "invalid_value",
        )
    raise TranslationError(
        f"Invalid value for 'tool_choice': {choice!r}; expected 'none', 'auto', "
        "'required' or a function.",
        "tool_choice",
        "invalid_value",
    )


#: OpenAI's reasoning efforts (and tiers clients add) -> the nearest ``think`` every
#: thinking-capable Ollama accepts; ``none`` turns thinking off.
_THINK_BY_EFFORT: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
    "ultra": "high",
}


def _think(req: _ChatRequestIn) -> bool | str | None:
    """``reasoning.effort`` (Responses-style) or ``reasoning_effort`` -> Ollama's ``think``."""
    if req.reasoning is not None and req.reasoning.effort is not None:
        effort, param = req.reasoning.effort, "reasoning.effort"
    elif req.reasoning_effort is not None:
        effort, param = req.reasoning_effort, "reasoning_effort"
    else:
        return None  # the model's own default
    think = _THINK_BY_EFFORT.get(effort.lower())
    if think is None:
        raise TranslationError(
            f"Invalid value for '{param}': {effort!r}; expected one of "
            "'none', 'minimal', 'low', 'medium', 'high', 'xhigh'.",
            param,
            "invalid_value",
        )
    return think


def translate_completion_request(body: bytes) -> CompletionRequestTranslation:
    """OpenAI ``/v1/completions`` body -> Ollama ``/api/generate`` request."""
    req = _decode_openai(_completion_request_decoder, body)
    _check_sampling(req)
    if req.echo:
        raise TranslationError("'echo' is not supported.", "echo", "unsupported_parameter")
    if req.best_of is not None and req.best_of > 1:
        raise TranslationError(
            "'best_of' greater than 1 is not supported.", "best_of", "unsupported_parameter"
        )
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise TranslationError(
                "'prompt' must be a string or a list of exactly one string; "
                "token arrays and batches are not supported.",
                "prompt",
            )
        prompt = prompt[0]
    return CompletionRequestTranslation(
        ollama=OllamaGenerateRequest(
            model=req.model,
            prompt=prompt,
            stream=bool(req.stream),
            suffix=req.suffix,
            options=_options(req, req.max_tokens),
            # ``logprobs: N`` asks for the chosen token's and the N likeliest ones
            logprobs=True if req.logprobs is not None else None,
            top_logprobs=req.logprobs or None,
        ),
        include_usage=_include_usage(req),
        session=_session_hint(req),
    )


def translate_embeddings_request(body: bytes) -> EmbeddingsRequestTranslation:
    """OpenAI ``/v1/embeddings`` body -> Ollama ``/api/embed`` request."""
    req = _decode_openai(_embeddings_request_decoder, body)
    value = req.input
    if isinstance(value, list):
        if not value:
            raise TranslationError("'input' must not be empty.", "input", "invalid_value")
        if not all(isinstance(item, str) for item in value):
            raise TranslationError(
                "'input' must be a string or a list of strings; token arrays are not supported.",
                "input",
            )
    # OpenAI refuses empty text (its client raises on the empty list Ollama answers)
    if value == "" or (isinstance(value, list) and "" in value):
        raise TranslationError(
            "'input' must not contain an empty string.", "input", "invalid_value"
        )
    return EmbeddingsRequestTranslation(
        ollama=OllamaEmbedRequest(model=req.model, input=value, dimensions=req.dimensions),
        encoding_format=req.encoding_format,
    )


def encode_ollama_request(
    request: OllamaChatRequest | OllamaGenerateRequest | OllamaEmbedRequest,
) -> bytes:
    """The JSON body to send upstream."""
    return _encoder.encode(request)


def _check_sampling(req: _SamplingFields) -> None:
    """Refuse, by name, what Ollama cannot do: several choices, token biases."""
    if req.n is not None and req.n != 1:
        raise TranslationError("Only n=1 is supported.", "n", "unsupported_parameter")
    if req.logit_bias:
        raise TranslationError(
            "'logit_bias' is not supported: the model server has no equivalent.",
            "logit_bias",
            "unsupported_parameter",
        )


def _include_usage(req: _SamplingFields) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _options(req: _SamplingFields, num_predict: int | None) -> OllamaOptions | None:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    options = OllamaOptions(
        num_predict=num_predict,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=stop or None,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
    )
    return None if options == _NO_OPTIONS else options


_NO_OPTIONS = OllamaOptions()


def _translate_tool(tool: _ToolIn, index: int) -> dict[str, Any]:
    param = f"tools[{index}]"
    if tool.type != "function":
        raise TranslationError(
            f"Tool type '{tool.type}' is not supported; only 'function' tools are.",
            f"{param}.type",
        )
    function = tool.function
    if function is None or not isinstance(function.get("name"), str) or not function["name"]:
        raise TranslationError("A function tool needs a 'name'.", f"{param}.function.name")
    return {"type": "function", "function": function}


def _translate_format(response_format: _ResponseFormat | None) -> str | dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "json"
    spec = response_format.json_schema
    if spec is None or spec.schema is None:
        raise TranslationError(
            "'response_format.json_schema.schema' is required for type 'json_schema'.",
            "response_format.json_schema.schema",
        )
    return spec.schema


def _translate_messages(messages: list[_MessageIn]) -> list[OllamaMessage]:
    out: list[OllamaMessage] = []
    # OpenAI links a tool result to its call by id; Ollama by the function's
    # name, so remember which name each id of the conversation belongs to.
    tool_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        content, images = _translate_content(msg.content, i)
        role = "system" if msg.role == "developer" else msg.role
        tool_calls: list[OllamaToolCall] | None = None
        if msg.tool_calls:
            if msg.role != "assistant":
                raise TranslationError(
                    "Only assistant messages may carry 'tool_calls'.", f"messages[{i}].tool_calls"
                )
            tool_calls = []
            for j, call in enumerate(msg.tool_calls):
                args = _tool_arguments(call.function.arguments, f"messages[{i}].tool_calls[{j}]")
                function = OllamaFunctionCall(call.function.name, args)
                tool_calls.append(OllamaToolCall(function, call.id or None))
                if call.id:
                    tool_names[call.id] = call.function.name
        tool_name: str | None = None
        tool_call_id: str | None = None
        if msg.role == "tool":
            tool_name = tool_names.get(msg.tool_call_id or "") or msg.name
            tool_call_id = msg.tool_call_id or None
        thinking = (msg.reasoning or msg.reasoning_content) if msg.role == "assistant" else None
        out.append(
            OllamaMessage(
                role, content, images, tool_calls, tool_name, tool_call_id, thinking or None
            )
        )
    return out


def _tool_arguments(arguments: str | dict[str, Any], param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        return _arguments_decoder.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        raise TranslationError(
            "Tool call arguments must be a JSON object encoded as a string.",
            f"{param}.function.arguments",
        ) from None


def _translate_content(
    content: str | list[_Part] | None, index: int
) -> tuple[str, list[str] | None]:
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, _TextPart):
            texts.append(part.text)
        elif isinstance(part, _ImagePart):
            images.append(_image_data(part.image_url.url, f"messages[{index}].content[{j}]"))
        else:
            kind = "Audio" if isinstance(part, _AudioPart) else "File"
            raise TranslationError(
                f"{kind} content parts are not supported; send text or images.",
                f"messages[{index}].content[{j}].type",
                "unsupported_parameter",
            )
    return "\n".join(texts), (images or None)


def _image_data(url: str, param: str) -> str:
    """A ``data:image/...;base64,`` URL -> its base64 payload, validated."""
    param = f"{param}.image_url.url"
    if not url.startswith("data:"):
        # Fetching arbitrary URLs from inside the network would make the
        # gateway an SSRF vector; the client sends the bytes instead.
        raise TranslationError(
            "Image URLs are not fetched by this API; send the image inline as a "
            "base64 'data:image/...;base64,...' URL.",
            param,
            "invalid_image_url",
        )
    header, sep, data = url.partition(",")
    media = header[5:].split(";")
    if not sep or not media[0].startswith("image/") or "base64" not in media[1:] or not data:
        raise TranslationError(
            "Image data URLs must look like 'data:image/<type>;base64,<data>'.",
            param,
            "invalid_image_url",
        )
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise TranslationError(
            "The image data is not valid base64.", param, "invalid_image_url"
        ) from None
    return data


# --------------------------------------------------------------------------- OpenAI responses


class _Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class _FunctionOut(msgspec.Struct):
    name: str
    arguments: str


class _ToolCallOut(msgspec.Struct):
    id: str
    type: str
    function: _FunctionOut


# ``content`` has no default, so it stays in the JSON even when it is ``null``
# (beside tool calls), as OpenAI sends it; the rest appear only when set.
class _MessageOut(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    #: The model's thinking: ``reasoning`` is Ollama's own ``/v1`` name,
    #: ``reasoning_content`` the one of DeepSeek's API, vLLM and LiteLLM.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCallOut] | None = None


class _TopLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class _TokenLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[_TopLogprobOut]


class _ChatLogprobs(msgspec.Struct):
    content: list[_TokenLogprobOut]


class _ChatChoice(msgspec.Struct):
    index: int
    message: _MessageOut
    logprobs: _ChatLogprobs | None
    finish_reason: str


class _TextLogprobs(msgspec.Struct):
    """The legacy completions shape: parallel lists, alternatives as ``{token: logprob}``."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[_ChatChoice]
    usage: _Usage


class _TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: _TextLogprobs | None
    # ``null`` until the stream's finish chunk, as OpenAI sends it.
    finish_reason: str | None


class _TextCompletion(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[_TextChoice]
    usage: _Usage | None = None


class _EmbeddingItem(msgspec.Struct):
    object: str
    embedding: list[float] | str
    index: int


class _EmbeddingList(msgspec.Struct):
    object: str
    data: list[_EmbeddingItem]
    model: str
    usage: _EmbeddingUsage


class _Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class _ModelList(msgspec.Struct):
    object: str
    data: list[_Model]


class _DeltaFunction(msgspec.Struct):
    name: str
    arguments: str


class _DeltaToolCall(msgspec.Struct):
    index: int
    id: str
    type: str
    function: _DeltaFunction


class _Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_DeltaToolCall] | None = None


class _ChunkChoice(msgspec.Struct, omit_defaults=True):
    index: int
    delta: _Delta
    # ``null`` until the finish chunk, as OpenAI sends it; clients test it.
    finish_reason: str | None
    logprobs: _ChatLogprobs | None = None


class _ChatChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[_ChunkChoice]
    usage: _Usage | None = None


def decode_ollama_chunk(data: bytes) -> OllamaChunk:
    """Decode one NDJSON line (or a non-streaming body) of ``/api/chat`` or ``/api/generate``.

    JSON in any spacing; a line that named none of the known fields is read
    again with its keys folded to lower case, as Go's decoder matches them.
    """
    chunk = _chunk_decoder.decode(data)
    if chunk.message is None and chunk.response is None and not chunk.done and not chunk.error:
        folded = fold_keys(_any_decoder.decode(data))
        if isinstance(folded, dict) and folded:
            return msgspec.convert(folded, OllamaChunk)
    return chunk


def decode_ollama_embed(data: bytes) -> OllamaEmbedResponse:
    """Decode an ``/api/embed`` response."""
    return _embed_decoder.decode(data)


def decode_ollama_tags(data: bytes) -> OllamaTags:
    """Decode an ``/api/tags`` response."""
    return _tags_decoder.decode(data)


def _now() -> int:
    return int(time.time())


def _usage(chunk: OllamaChunk) -> _Usage:
    prompt = chunk.prompt_eval_count or 0
    completion = chunk.eval_count or 0
    return _Usage(prompt, completion, prompt + completion)


def tool_call_id(call: OllamaToolCall) -> str:
    """Ollama's id for a call, or a fresh unique one (ids must not repeat across turns)."""
    return call.id or f"call_{secrets.token_hex(12)}"


def _tool_calls_out(calls: list[OllamaToolCall]) -> list[_ToolCallOut]:
    return [
        _ToolCallOut(tool_call_id(call), "function", _function_out(call.function)) for call in calls
    ]


def _top_out(top: list[OllamaTokenLogprob] | None) -> list[_TopLogprobOut]:
    return [_TopLogprobOut(t.token, t.logprob, t.bytes) for t in top or ()]


def chat_logprobs(logprobs: list[OllamaLogprob] | None) -> _ChatLogprobs | None:
    """Ollama's per-token logprobs -> a chat choice's ``logprobs`` (``None`` when absent)."""
    if not logprobs:
        return None
    return _ChatLogprobs(
        [
            _TokenLogprobOut(lp.token, lp.logprob, lp.bytes, _top_out(lp.top_logprobs))
            for lp in logprobs
        ]
    )


def text_logprobs(logprobs: list[OllamaLogprob] | None, offset: int = 0) -> _TextLogprobs | None:
    """Ollama's per-token logprobs -> a completion choice's legacy ``logprobs``.

    ``offset``: where in the whole text this piece starts (``text_offset``).
    """
    if not logprobs:
        return None
    offsets: list[int] = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return _TextLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{t.token: t.logprob for t in lp.top_logprobs or ()} for lp in logprobs],
        text_offset=offsets,
    )


def _function_out(function: OllamaFunctionCall) -> _FunctionOut:
    # OpenAI carries tool arguments as a JSON *string*.
    return _FunctionOut(function.name, _encoder.encode(function.arguments).decode())


def _finish_reason(done_reason: str | None, *, tool_calls: bool = False) -> str:
    # a cut-off answer is "length" even when it had begun a tool call
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def chat_completion_body(
    response: OllamaChunk, *, request_id: str, model: str, created: int | None = None
) -> bytes:
    """A non-streaming Ollama chat response -> OpenAI ``chat.completion`` JSON."""
    msg = response.message or OllamaResponseMessage()
    thinking = msg.thinking or None
    if msg.tool_calls:
        calls = _tool_calls_out(msg.tool_calls)
        message = _MessageOut("assistant", msg.content or None, thinking, thinking, calls)
    else:
        message = _MessageOut("assistant", msg.content, thinking, thinking)
    reason = _finish_reason(response.done_reason, tool_calls=bool(msg.tool_calls))
    return _encoder.encode(
        _ChatCompletion(
            id=f"chatcmpl-{request_id}",
            object="chat.completion",
            created=_now() if created is None else created,
            model=model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[_ChatChoice(0, message, chat_logprobs(response.logprobs), reason)],
            usage=_usage(response),
        )
    )


def completion_body(
    response: OllamaChunk, *, request_id: str, model: str, created: int | None = None
) -> bytes:
    """A non-streaming Ollama generate response -> OpenAI ``text_completion`` JSON."""
    choice = _TextChoice(
        0,
        response.response or "",
        text_logprobs(response.logprobs),
        _finish_reason(response.done_reason),
    )
    return _encoder.encode(
        _TextCompletion(
            id=f"cmpl-{request_id}",
            object="text_completion",
            created=_now() if created is None else created,
            model=model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[choice],
            usage=_usage(response),
        )
    )


def _float32_base64(vector: list[float]) -> str:
    # OpenAI's base64 encoding is little-endian float32; its clients decode that.
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings_body(
    response: OllamaEmbedResponse,
    *,
    model: str,
    encoding_format: Literal["float", "base64"] = "float",
) -> bytes:
    """An Ollama ``/api/embed`` response -> OpenAI embeddings list JSON."""
    as_base64 = encoding_format == "base64"
    data = [
        _EmbeddingItem("embedding", _float32_base64(vec) if as_base64 else vec, i)
        for i, vec in enumerate(response.embeddings)
    ]
    tokens = response.prompt_eval_count or 0
    return _encoder.encode(_EmbeddingList("list", data, model, _EmbeddingUsage(tokens, tokens)))


def owned_by(name: str) -> str:
    """The namespace of a model name: ``"library"`` for Ollama's default one.

    ``llama3.2:latest`` -> ``library``; ``acme/tuned:1`` -> ``acme``;
    ``hf.co/org/model:q4`` -> ``org``.
    """
    parts = name.split("/")
    if len(parts) < 2:
        return "library"
    return parts[-2]


def _created(modified_at: str) -> int:
    # Ollama writes nanoseconds; fromisoformat (3.11) keeps microseconds.
    try:
        return int(datetime.fromisoformat(modified_at).timestamp())
    except ValueError:
        return 0


def _model(entry: OllamaModelEntry) -> _Model:
    return _Model(entry.name, "model", _created(entry.modified_at), owned_by(entry.name))


def models_list_body(models: Sequence[OllamaModelEntry]) -> bytes:
    """The (already filtered) ``/api/tags`` models -> OpenAI ``/v1/models`` JSON."""
    return _encoder.encode(_ModelList("list", [_model(m) for m in models]))


def model_body(model: OllamaModelEntry) -> bytes:
    """One ``/api/tags`` model -> OpenAI ``/v1/models/{model}`` JSON."""
    return _encoder.encode(_model(model))


# --------------------------------------------------------------------------- errors


def translation_error_body(error: TranslationError) -> bytes:
    """The 400 body for a :class:`TranslationError`."""
    return openai_error_body(error.message, code=error.code, param=error.param)


def error_event(
    message: str, *, error_type: str = "server_error", code: str | None = None
) -> bytes:
    """An SSE frame for a failure after the stream started; the openai client raises on it."""
    return b"data: " + openai_error_body(message, error_type=error_type, code=code) + b"\n\n"


def ollama_error_to_openai(status: int, message: str) -> tuple[int, bytes]:
    """An upstream Ollama error (status, its ``error`` text) -> (status, OpenAI error body)."""
    if status == 404:
        return 404, openai_error_body(message, code="model_not_found", param="model")
    if status == 429:
        return 429, openai_error_body(
            message, error_type="rate_limit_error", code="rate_limit_exceeded"
        )
    if status == 503:
        # Ollama's "server busy" (its queue is full) is retryable: keep the 503.
        return 503, openai_error_body(message, error_type="server_error", code="server_busy")
    if 400 <= status < 500:
        return 400, openai_error_body(message)
    if status in {502, 504}:
        return status, openai_error_body(message, error_type="server_error")
    return 500, openai_error_body(message, error_type="server_error")


# --------------------------------------------------------------------------- streaming


def _frame(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


_TEXT_SENTINEL = "\x00nz-text\x00"
_ENCODED_SENTINEL = _encoder.encode(_TEXT_SENTINEL)


def _template(payload: msgspec.Struct) -> tuple[bytes, bytes]:
    """Split an encoded frame around the sentinel text: (prefix, suffix)."""
    prefix, suffix = _frame(payload).split(_ENCODED_SENTINEL)
    return prefix, suffix


class _StreamTranslator:
    """What both stream translators share: state, usage and the closing frames."""

    __slots__ = (
        "_created",
        "_id",
        "_include_usage",
        "_model",
        "_text_prefix",
        "_text_suffix",
        "completion_tokens",
        "content_chunks",
        "failed",
        "finished",
        "prompt_tokens",
    )

    def __init__(
        self, response_id: str, model: str, *, include_usage: bool, created: int | None
    ) -> None:
        self._id = response_id
        self._model = model
        self._include_usage = include_usage
        self._created = _now() if created is None else created
        self.finished = False
        self.failed = False
        #: Ollama chunks that carried output: what a cut-off stream has produced.
        self.content_chunks = 0
        #: The counts of Ollama's final chunk, once it has arrived.
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # Text deltas are the hot path: everything but the text is the same for
        # the whole stream, so it is encoded once and the text spliced in.
        self._text_prefix, self._text_suffix = _template(self._text_payload(_TEXT_SENTINEL))

    def feed_line(self, line: bytes) -> bytes:
        """Decode one Ollama NDJSON line and translate it (a blank line gives ``b""``)."""
        if not line.strip():
            return b""
        return self.feed(decode_ollama_chunk(line))

    def feed(self, chunk: OllamaChunk) -> bytes:
        """Translate one decoded Ollama chunk into the SSE frames to send (maybe none)."""
        if self.finished:
            return b""
        if chunk.error is not None:
            self.finished = self.failed = True
            return error_event(chunk.error)
        out = self._translate(chunk)
        if chunk.done:
            self.finished = True
            self.prompt_tokens = chunk.prompt_eval_count or 0
            self.completion_tokens = chunk.eval_count or 0
            if self._include_usage:
                out += self._usage_frame(_usage(chunk))
            out += DONE_FRAME
        return out

    def fail(self, message: str) -> bytes:
        """End the stream with an error event (the upstream broke off without one)."""
        if self.finished:
            return b""
        self.finished = self.failed = True
        return error_event(message)

    def _text_frame(self, text: str) -> bytes:
        return self._text_prefix + _encoder.encode(text) + self._text_suffix

    def _text_payload(self, text: str) -> msgspec.Struct:
        raise NotImplementedError

    def _translate(self, chunk: OllamaChunk) -> bytes:
        raise NotImplementedError

    def _usage_frame(self, usage: _Usage) -> bytes:
        raise NotImplementedError


class ChatStreamTranslator(_StreamTranslator):
    """Ollama ``/api/chat`` NDJSON chunks -> OpenAI ``chat.completion.chunk`` SSE frames.

    Frames: a role chunk, content and tool-call deltas, a finish chunk, the
    usage chunk (only with ``include_usage``), then ``data: [DONE]``.
    """

    __slots__ = ("_started", "_tool_calls")

    def __init__(
        self,
        request_id: str,
        model: str,
        include_usage: bool = False,
        *,
        created: int | None = None,
    ) -> None:
        super().__init__(
            f"chatcmpl-{request_id}", model, include_usage=include_usage, created=created
        )
        self._started = False
        self._tool_calls = 0

    def _chunk(self, choices: list[_ChunkChoice], usage: _Usage | None = None) -> _ChatChunk:
        return _ChatChunk(
            self._id,
            "chat.completion.chunk",
            self._created,
            self._model,
            SYSTEM_FINGERPRINT,
            choices,
            usage,
        )

    def _delta_frame(
        self,
        delta: _Delta,
        finish_reason: str | None = None,
        logprobs: _ChatLogprobs | None = None,
    ) -> bytes:
        return _frame(self._chunk([_ChunkChoice(0, delta, finish_reason, logprobs)]))

    def _text_payload(self, text: str) -> msgspec.Struct:
        return self._chunk([_ChunkChoice(0, _Delta(content=text), None)])

    def _translate(self, chunk: OllamaChunk) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            out = self._delta_frame(_Delta(role="assistant", content=""))
        msg = chunk.message
        # the chunk's logprobs ride on its first frame, as Ollama's own /v1 sends them
        logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs else None
        if msg is not None and msg.thinking:
            # streamed while the model thinks, and counted: thinking is billed output
            self.content_chunks += 1
            delta = _Delta(reasoning=msg.thinking, reasoning_content=msg.thinking)
            out += self._delta_frame(delta, None, logprobs)
            logprobs = None
        if msg is not None and msg.content:
            self.content_chunks += 1
            if logprobs is None:
                out += self._text_frame(msg.content)
            else:
                out += self._delta_frame(_Delta(content=msg.content), None, logprobs)
                logprobs = None
        if msg is not None and msg.tool_calls:
            self.content_chunks += 1
            first = self._tool_calls
            calls = [
                _DeltaToolCall(
                    first + n,
                    tool_call_id(c),
                    "function",
                    _DeltaFunction(c.function.name, _encoder.encode(c.function.arguments).decode()),
                )
                for n, c in enumerate(msg.tool_calls)
            ]
            self._tool_calls += len(calls)
            out += self._delta_frame(_Delta(tool_calls=calls), None, logprobs)
        if chunk.done:
            reason = _finish_reason(chunk.done_reason, tool_calls=self._tool_calls > 0)
            out += self._delta_frame(_Delta(), reason)
        return out

    def _usage_frame(self, usage: _Usage) -> bytes:
        return _frame(self._chunk([], usage))


class CompletionStreamTranslator(_StreamTranslator):
    """Ollama ``/api/generate`` NDJSON chunks -> OpenAI ``text_completion`` SSE frames.

    Frames: text deltas, a finish chunk (empty text), the usage chunk (only
    with ``include_usage``), then ``data: [DONE]``.
    """

    __slots__ = ("_offset",)

    def __init__(
        self,
        request_id: str,
        model: str,
        include_usage: bool = False,
        *,
        created: int | None = None,
    ) -> None:
        super().__init__(f"cmpl-{request_id}", model, include_usage=include_usage, created=created)
        self._offset = 0  # characters of text sent so far (logprobs' text_offset)

    def _completion(
        self, choices: list[_TextChoice], usage: _Usage | None = None
    ) -> _TextCompletion:
        return _TextCompletion(
            self._id,
            "text_completion",
            self._created,
            self._model,
            SYSTEM_FINGERPRINT,
            choices,
            usage,
        )

    def _text_payload(self, text: str) -> msgspec.Struct:
        return self._completion([_TextChoice(0, text, None, None)])

    def _translate(self, chunk: OllamaChunk) -> bytes:
        out = b""
        if chunk.response:
            self.content_chunks += 1
            if chunk.logprobs:
                logprobs = text_logprobs(chunk.logprobs, self._offset)
                out = _frame(self._completion([_TextChoice(0, chunk.response, logprobs, None)]))
            else:
                out = self._text_frame(chunk.response)
            self._offset += len(chunk.response)
        if chunk.done:
            reason = _finish_reason(chunk.done_reason)
            out += _frame(self._completion([_TextChoice(0, "", None, reason)]))
        return out

    def _usage_frame(self, usage: _Usage) -> bytes:
        return _frame(self._completion([], usage))
