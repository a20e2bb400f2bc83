"""Anthropic Messages <-> Ollama ``/api/chat``. Pure: bytes in, Structs and bytes out.

- ``POST /v1/messages``: :func:`translate_messages_request`,
  :func:`message_body`, :class:`MessageStreamTranslator` (Anthropic's
  ``message_start`` ... ``message_stop`` server-sent events);
- ``POST /v1/messages/count_tokens``: :func:`translate_count_tokens_request`,
  :func:`count_tokens_body`;
- errors: :func:`anthropic_error_body` (also used for the dialect of auth's
  refusals), :func:`error_event` for a failure after the stream started.

What each request field becomes (translated, ignored on purpose or refused)
is listed in scope-docs/SPEC.md; a request this module cannot express raises
:class:`~neuronetz_gateway.domain.ollama_chat.SurfaceError` (400).
"""

from __future__ import annotations

import binascii
from typing import Annotated, Any, Literal

import msgspec

from neuronetz_gateway.domain.dialect import ANTHROPIC, error_body
from neuronetz_gateway.domain.ollama_chat import (
    ChatChunk,
    ChatFunction,
    ChatMessage,
    ChatOptions,
    ChatRequest,
    ChatToolCall,
    SurfaceError,
    decode_chat_chunk,
    decode_request,
)

__all__ = [
    "MessageStreamTranslator",
    "MessagesTranslation",
    "anthropic_error_body",
    "count_tokens_body",
    "error_event",
    "message_body",
    "ping_event",
    "stop_reason",
    "translate_count_tokens_request",
    "translate_messages_request",
]

# --------------------------------------------------------------------------- requests

_Temperature = Annotated[float, msgspec.Meta(ge=0, le=1)]
_Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
_MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
_TopK = Annotated[int, msgspec.Meta(ge=0)]


class _Base64Source(msgspec.Struct, tag="base64", tag_field="type"):
    media_type: str
    data: str


class _URLSource(msgspec.Struct, tag="url", tag_field="type"):
    url: str


class _TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class _ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    source: _Base64Source | _URLSource


class _ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class _ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[_TextBlock | _ImageBlock] | None = None
    is_error: bool | None = None


class _ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str | None = None


class _RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


_Block = (
    _TextBlock
    | _ImageBlock
    | _ToolUseBlock
    | _ToolResultBlock
    | _ThinkingBlock
    | _RedactedThinkingBlock
)


class _MessageIn(msgspec.Struct):
    # "system" inside messages: Claude Code sends one (text blocks only)
    role: Literal["user", "assistant", "system"]
    content: str | list[_Block]


class _ToolIn(msgspec.Struct):
    name: str
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    description: str | None = None
    type: str | None = None


class _ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Thinking(msgspec.Struct):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class _PromptFields(msgspec.Struct, kw_only=True):
    model: str
    messages: list[_MessageIn]
    system: str | list[_TextBlock] | None = None
    tools: list[_ToolIn] | None = None
    tool_choice: _ToolChoice | None = None
    thinking: _Thinking | None = None


class _MessagesRequestIn(_PromptFields, kw_only=True):
    max_tokens: _MaxTokens
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: _Temperature | None = None
    top_p: _Unit | None = None
    top_k: _TopK | None = None
    # metadata, service_tier, container, context_management, mcp_servers and
    # cache_control on blocks: accepted and ignored (scope-docs/SPEC.md).


class MessagesTranslation(msgspec.Struct):
    """A translated Messages request (``max_tokens`` is in ``ollama.options.num_predict``)."""

    ollama: ChatRequest


_messages_decoder = msgspec.json.Decoder(_MessagesRequestIn)
_count_decoder = msgspec.json.Decoder(_PromptFields)
_encoder = msgspec.json.Encoder()
# Tool types Anthropic runs on its own servers; Ollama has none of them.
_CLIENT_TOOL_TYPES = (None, "custom")


def translate_messages_request(body: bytes) -> MessagesTranslation:
    """Anthropic ``/v1/messages`` body -> Ollama ``/api/chat`` request."""
    req = decode_request(_messages_decoder, body)
    chat = _chat_request(req, stream=bool(req.stream))
    options = ChatOptions(
        num_predict=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=req.stop_sequences or None,
    )
    chat.options = options
    return MessagesTranslation(ollama=chat)


def translate_count_tokens_request(body: bytes) -> ChatRequest:
    """Anthropic ``/v1/messages/count_tokens`` body -> the chat request it would send."""
    return _chat_request(decode_request(_count_decoder, body), stream=False)


def _chat_request(req: _PromptFields, *, stream: bool) -> ChatRequest:
    if not req.messages:
        raise SurfaceError("messages: at least one message is required", "messages")
    messages: list[ChatMessage] = []
    system = _system_text(req.system)
    if system:
        messages.append(ChatMessage("system", system))
    tool_names: dict[str, str] = {}
    for i, message in enumerate(req.messages):
        messages.extend(_translate_message(message, i, tool_names))
    tools: list[dict[str, Any]] | None = None
    # Ollama cannot force a tool: "any" and a named tool are best-effort (the
    # tools are offered); "none" withholds them.
    if req.tools and not (req.tool_choice and req.tool_choice.type == "none"):
        tools = [_translate_tool(tool, i) for i, tool in enumerate(req.tools)]
    think: bool | None = None
    if req.thinking is not None:
        think = req.thinking.type != "disabled"
    return ChatRequest(model=req.model, messages=messages, stream=stream, tools=tools, think=think)


def _system_text(system: str | list[_TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n".join(block.text for block in system)


def _translate_tool(tool: _ToolIn, index: int) -> dict[str, Any]:
    if tool.type not in _CLIENT_TOOL_TYPES:
        raise SurfaceError(
            f"tools[{index}].type: server tool '{tool.type}' is not available on this gateway",
            f"tools[{index}].type",
        )
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _translate_message(
    message: _MessageIn, index: int, tool_names: dict[str, str]
) -> list[ChatMessage]:
    """One Anthropic message -> Ollama messages (tool results become ``tool`` messages)."""
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    texts: list[str] = []
    thinking: list[str] = []
    images: list[str] = []
    calls: list[ChatToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(message.content):
        where = f"messages[{index}].content[{j}]"
        if isinstance(block, _TextBlock):
            texts.append(block.text)
        elif isinstance(block, _ImageBlock):
            images.append(_image_data(block.source, f"{where}.source"))
        elif isinstance(block, _ToolUseBlock):
            if message.role != "assistant":
                raise SurfaceError(f"{where}: tool_use blocks belong to assistant messages", where)
            calls.append(ChatToolCall(ChatFunction(block.name, block.input), id=block.id))
            tool_names[block.id] = block.name
        elif isinstance(block, _ToolResultBlock):
            if message.role != "user":
                raise SurfaceError(f"{where}: tool_result blocks belong to user messages", where)
            results.append(_tool_result(block, where, tool_names))
        elif isinstance(block, _ThinkingBlock):
            thinking.append(block.thinking)
        # redacted_thinking: opaque to any model but Anthropic's; dropped
    out = list(results)  # a tool result answers the call just before it: results first
    if texts or images or calls or thinking:
        out.append(
            ChatMessage(
                message.role,
                "\n".join(texts),
                thinking="\n".join(thinking) or None,
                images=images or None,
                tool_calls=calls or None,
            )
        )
    return out


def _tool_result(block: _ToolResultBlock, where: str, tool_names: dict[str, str]) -> ChatMessage:
    content = block.content
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for k, part in enumerate(content):
            if isinstance(part, _TextBlock):
                texts.append(part.text)
            else:
                images.append(_image_data(part.source, f"{where}.content[{k}].source"))
    return ChatMessage(
        "tool",
        "\n".join(texts),
        images=images or None,
        tool_name=tool_names.get(block.tool_use_id),
        tool_call_id=block.tool_use_id,
    )


def _image_data(source: _Base64Source | _URLSource, param: str) -> str:
    if isinstance(source, _URLSource):
        # Fetching arbitrary URLs from inside the network would make the
        # gateway an SSRF vector; the client sends the bytes instead.
        raise SurfaceError(
            f"{param}: image URLs are not fetched by this gateway; send a base64 source", param
        )
    if not source.media_type.startswith("image/"):
        raise SurfaceError(f"{param}.media_type: must be an image type", f"{param}.media_type")
    try:
        binascii.a2b_base64(source.data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SurfaceError(f"{param}.data: not valid base64", f"{param}.data") from None
    if not source.data:
        raise SurfaceError(f"{param}.data: empty image", f"{param}.data")
    return source.data


# --------------------------------------------------------------------------- responses


class _Usage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class _TextOut(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class _ThinkingOut(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""


class _ToolUseOut(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class _Message(msgspec.Struct, tag="message", tag_field="type"):
    id: str
    role: str
    model: str
    content: list[_TextOut | _ThinkingOut | _ToolUseOut]
    stop_reason: str | None
    stop_sequence: str | None
    usage: _Usage


def stop_reason(done_reason: str | None, *, tool_use: bool) -> str:
    """Anthropic's ``stop_reason`` for Ollama's ``done_reason``.

    Ollama does not say whether a stop sequence or the end of turn stopped
    it (both are ``stop``), so ``stop_sequence`` is never reported.
    """
    if tool_use:
        return "tool_use"
    if done_reason == "length":
        return "max_tokens"
    return "end_turn"


def _tool_id(call: ChatToolCall, message_id: str, n: int) -> str:
    return call.id or f"toolu_{message_id.removeprefix('msg_')}_{n}"


def message_body(chunk: ChatChunk, *, message_id: str, model: str) -> bytes:
    """A non-streamed Ollama chat body -> Anthropic's ``message`` object."""
    content: list[_TextOut | _ThinkingOut | _ToolUseOut] = []
    message = chunk.message
    calls = (message.tool_calls or []) if message else []
    if message is not None and message.thinking:
        content.append(_ThinkingOut(message.thinking))
    if message is not None and message.content:
        content.append(_TextOut(message.content))
    for n, call in enumerate(calls):
        content.append(
            _ToolUseOut(_tool_id(call, message_id, n), call.function.name, call.function.arguments)
        )
    return _encoder.encode(
        _Message(
            id=message_id,
            role="assistant",
            model=model,
            content=content,
            stop_reason=stop_reason(chunk.done_reason, tool_use=bool(calls)),
            stop_sequence=None,
            usage=_Usage(chunk.prompt_eval_count or 0, chunk.eval_count or 0),
        )
    )


class _CountTokens(msgspec.Struct):
    input_tokens: int


def count_tokens_body(estimate: int) -> bytes:
    """``{"input_tokens": N}``: the gateway's prompt estimate, not a tokenizer's count."""
    return _encoder.encode(_CountTokens(estimate))


# --------------------------------------------------------------------------- errors


def anthropic_error_body(status: int, message: str) -> bytes:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, the type by status."""
    return error_body(ANTHROPIC, status, "", message)


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


def error_event(message: str, status: int = 500) -> bytes:
    """The ``error`` event for a failure after the stream started."""
    return _event(b"error", anthropic_error_body(status, message))


def ping_event() -> bytes:
    """The ``ping`` event Anthropic sends while a client waits."""
    return _event(b"ping", b'{"type":"ping"}')


# --------------------------------------------------------------------------- streaming


class _StartMessage(msgspec.Struct, tag="message", tag_field="type"):
    id: str
    role: str
    model: str
    content: list[Any]
    stop_reason: None
    stop_sequence: None
    usage: _Usage


class _MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    message: _StartMessage


class _BlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: _TextOut | _ThinkingOut | _ToolUseOut


class _TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class _ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class _SignatureDelta(msgspec.Struct, tag="signature_delta", tag_field="type"):
    signature: str


class _JSONDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class _BlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: _TextDelta | _ThinkingDelta | _SignatureDelta | _JSONDelta


class _BlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class _StopDelta(msgspec.Struct):
    stop_reason: str
    stop_sequence: None = None


class _MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: _StopDelta
    usage: _Usage


_MESSAGE_STOP = _event(b"message_stop", b'{"type":"message_stop"}')


class MessageStreamTranslator:
    """Ollama ``/api/chat`` NDJSON lines -> Anthropic Messages stream events.

    :meth:`opening` is sent as soon as Ollama has accepted the request
    (``message_start`` with the prompt estimate as ``input_tokens``, then a
    ``ping``); each line then opens, extends and closes ``thinking``,
    ``text`` and ``tool_use`` blocks; the final line closes the open block and
    sends ``message_delta`` (stop reason, real usage) and ``message_stop``.
    """

    __slots__ = (
        "_estimate",
        "_id",
        "_index",
        "_model",
        "_open",
        "_tool_calls",
        "completion_tokens",
        "content_chunks",
        "failed",
        "finished",
        "prompt_tokens",
    )

    def __init__(self, message_id: str, model: str, prompt_estimate: int) -> None:
        self._id = message_id
        self._model = model
        self._estimate = prompt_estimate
        self._index = 0
        self._open: Literal["text", "thinking"] | None = None
        self._tool_calls = 0
        self.finished = False
        self.failed = False
        self.content_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def opening(self) -> bytes:
        """``message_start`` and a first ``ping``."""
        start = _MessageStart(
            _StartMessage(
                id=self._id,
                role="assistant",
                model=self._model,
                content=[],
                stop_reason=None,
                stop_sequence=None,
                usage=_Usage(self._estimate, 0),
            )
        )
        return _event(b"message_start", _encoder.encode(start)) + ping_event()

    def ping(self) -> bytes:
        """Keeps the client's connection busy while the model is slow."""
        return b"" if self.finished else ping_event()

    def feed_line(self, line: bytes) -> bytes:
        """Decode one Ollama NDJSON line and translate it (a blank line gives ``b""``)."""
        if not line.strip():
            return b""
        return self.feed(decode_chat_chunk(line))

    def fail(self, message: str) -> bytes:
        """End the stream with an ``error`` event."""
        if self.finished:
            return b""
        self.finished = self.failed = True
        return error_event(message)

    def refused(self, status: int, code: str, message: str) -> bytes:
        """A request refused after its stream started (it waited for a slot, then none came):
        the ``error`` event of ``status`` (503: ``overloaded_error``)."""
        if self.finished:
            return b""
        self.finished = self.failed = True
        return error_event(message, status)

    def _block(self, kind: Literal["text", "thinking"]) -> bytes:
        """Close a different open block and open ``kind`` (if not open already)."""
        if self._open == kind:
            return b""
        out = self._close()
        self._open = kind
        block: _TextOut | _ThinkingOut = _TextOut("") if kind == "text" else _ThinkingOut("")
        start = _BlockStart(self._index, block)
        return out + _event(b"content_block_start", _encoder.encode(start))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            delta = _BlockDelta(self._index, _SignatureDelta(""))
            out = _event(b"content_block_delta", _encoder.encode(delta))
        self._open = None
        out += _event(b"content_block_stop", _encoder.encode(_BlockStop(self._index)))
        self._index += 1
        return out

    def _delta(self, delta: _TextDelta | _ThinkingDelta | _JSONDelta) -> bytes:
        return _event(b"content_block_delta", _encoder.encode(_BlockDelta(self._index, delta)))

    def feed(self, chunk: ChatChunk) -> bytes:
        """Translate one decoded Ollama chunk into the events to send (maybe none)."""
        if self.finished:
            return b""
        if chunk.error is not None:
            self.finished = self.failed = True
            return error_event(chunk.error)
        out = b""
        message = chunk.message
        if message is not None:
            if message.thinking:
                self.content_chunks += 1
                out += self._block("thinking") + self._delta(_ThinkingDelta(message.thinking))
            if message.content:
                self.content_chunks += 1
                out += self._block("text") + self._delta(_TextDelta(message.content))
            for call in message.tool_calls or ():
                self.content_chunks += 1
                out += self._close()
                call_id = _tool_id(call, self._id, self._tool_calls)
                self._tool_calls += 1
                start = _BlockStart(self._index, _ToolUseOut(call_id, call.function.name, {}))
                out += _event(b"content_block_start", _encoder.encode(start))
                out += self._delta(_JSONDelta(_encoder.encode(call.function.arguments).decode()))
                out += _event(b"content_block_stop", _encoder.encode(_BlockStop(self._index)))
                self._index += 1
        if chunk.done:
            self.finished = True
            self.prompt_tokens = chunk.prompt_eval_count or 0
            self.completion_tokens = chunk.eval_count or 0
            out += self._close()
            reason = stop_reason(chunk.done_reason, tool_use=self._tool_calls > 0)
            delta = _MessageDelta(
                _StopDelta(reason), _Usage(self.prompt_tokens, self.completion_tokens)
            )
            out += _event(b"message_delta", _encoder.encode(delta)) + _MESSAGE_STOP
        return out
