"""OpenAI Responses (stateless) <-> Ollama ``/api/chat``. Pure: bytes in, Structs and bytes out.

- ``POST /v1/responses``: :func:`translate_responses_request`,
  :func:`response_body`, :class:`ResponseStreamTranslator` (the
  ``response.*`` server-sent events, each with its ``sequence_number``).

Nothing is stored: ``previous_response_id`` and ``conversation`` are
refused, ``store: true`` is accepted and answered with ``store: false``.
What each field becomes (translated, ignored on purpose, refused) is listed
in scope-docs/SPEC.md; a request this module cannot express raises
:class:`~neuronetz_gateway.domain.ollama_chat.SurfaceError` (400).
"""

from __future__ import annotations

import binascii
import time
from typing import Annotated, Any, Literal

import msgspec

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
    "ResponseStreamTranslator",
    "ResponsesTranslation",
    "response_body",
    "translate_responses_request",
]

# --------------------------------------------------------------------------- requests

_Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
_Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
_PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Reasoning(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class _TextFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


class _Text(msgspec.Struct):
    format: _TextFormat | None = None
    verbosity: str | None = None


class _RequestIn(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: _PositiveInt | None = None
    temperature: _Temperature | None = None
    top_p: _Unit | None = None
    reasoning: _Reasoning | None = None
    text: _Text | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    # parallel_tool_calls, include, prompt_cache_key, safety_identifier, user,
    # service_tier, truncation, top_logprobs, stream_options: ignored.


class ResponsesTranslation(msgspec.Struct):
    """A translated Responses request and what the answer echoes back."""

    ollama: ChatRequest
    echo: dict[str, Any]


_request_decoder = msgspec.json.Decoder(_RequestIn)
_arguments_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()

_EFFORT_TO_THINK: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def translate_responses_request(body: bytes) -> ResponsesTranslation:
    """OpenAI ``/v1/responses`` body -> Ollama ``/api/chat`` request."""
    req = decode_request(_request_decoder, body)
    if req.previous_response_id is not None:
        raise SurfaceError(
            "previous_response_id: this gateway stores no responses; send the whole "
            "conversation as 'input' items",
            "previous_response_id",
        )
    if req.conversation is not None:
        raise SurfaceError("conversation: this gateway stores no conversations", "conversation")
    if req.background:
        raise SurfaceError("background: background responses are not supported", "background")
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage("system", req.instructions))
    if isinstance(req.input, str):
        messages.append(ChatMessage("user", req.input))
    else:
        _translate_items(req.input, messages)
    if not any(m.role != "system" for m in messages):
        raise SurfaceError("input: at least one input item is required", "input")
    tools: list[dict[str, Any]] | None = None
    if req.tools and req.tool_choice != "none":
        tools = [t for t in (_translate_tool(tool, i) for i, tool in enumerate(req.tools)) if t]
    think: bool | str | None = None
    effort = req.reasoning.effort if req.reasoning else None
    if effort is not None:
        if effort not in _EFFORT_TO_THINK:
            raise SurfaceError(f"reasoning.effort: unknown effort '{effort}'", "reasoning.effort")
        think = _EFFORT_TO_THINK[effort]
    options = ChatOptions(
        num_predict=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p
    )
    chat = ChatRequest(
        model=req.model,
        messages=messages,
        stream=bool(req.stream),
        tools=tools or None,
        format=_format(req.text),
        think=think,
        options=None if options == ChatOptions() else options,
    )
    echo: dict[str, Any] = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "reasoning": {
            "effort": effort,
            "summary": req.reasoning.summary if req.reasoning else None,
        },
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "text": {"format": msgspec.to_builtins(req.text.format)}
        if req.text and req.text.format
        else {"format": {"type": "text"}},
    }
    return ResponsesTranslation(ollama=chat, echo=echo)


def _format(text: _Text | None) -> str | dict[str, Any] | None:
    if text is None or text.format is None or text.format.type == "text":
        return None
    if text.format.type == "json_object":
        return "json"
    if not text.format.schema:
        raise SurfaceError("text.format.schema: a json_schema format needs a schema", "text.format")
    return text.format.schema


def _translate_tool(tool: dict[str, Any], index: int) -> dict[str, Any] | None:
    """A ``function`` tool -> Ollama's; other tool types are ignored (scope-docs/SPEC.md)."""
    if tool.get("type") != "function":
        return None
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise SurfaceError(f"tools[{index}].name: a function tool needs a name", f"tools[{index}]")
    function: dict[str, Any] = {"name": name, "parameters": tool.get("parameters") or {}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _str(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise SurfaceError(f"{where}.{key}: a string is required", f"{where}.{key}")
    return value


def _translate_items(items: list[dict[str, Any]], out: list[ChatMessage]) -> None:
    thinking: str | None = None  # a reasoning item belongs to the assistant turn after it
    tool_names: dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, where)
            if message.role == "assistant" and thinking:
                message.thinking, thinking = thinking, None
            out.append(message)
        elif kind == "function_call":
            name = _str(item, "name", where)
            call_id = _str(item, "call_id", where)
            arguments = _arguments(item.get("arguments", ""), f"{where}.arguments")
            call = ChatToolCall(ChatFunction(name, arguments), id=call_id)
            tool_names[call_id] = name
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            elif last is not None and last.role == "assistant" and not last.tool_calls:
                last.tool_calls = [call]
            else:
                out.append(ChatMessage("assistant", tool_calls=[call], thinking=thinking))
                thinking = None
        elif kind == "function_call_output":
            call_id = _str(item, "call_id", where)
            text, images = _content(item.get("output"), f"{where}.output")
            out.append(
                ChatMessage(
                    "tool",
                    text,
                    images=images,
                    tool_name=tool_names.get(call_id),
                    tool_call_id=call_id,
                )
            )
        elif kind == "reasoning":
            thinking = _reasoning_text(item) or thinking
        else:
            raise SurfaceError(
                f"{where}.type: input items of type '{kind}' are not supported", f"{where}.type"
            )
    if thinking:
        out.append(ChatMessage("assistant", thinking=thinking))


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = item.get("role")
    if role not in _ROLES:
        raise SurfaceError(f"{where}.role: must be user, assistant, system or developer", where)
    text, images = _content(item.get("content"), f"{where}.content")
    return ChatMessage(_ROLES[role], text, images=images)


def _content(content: object, where: str) -> tuple[str, list[str] | None]:
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise SurfaceError(f"{where}: a string or a list of content parts is required", where)
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            texts.append(_str(part, "refusal" if kind == "refusal" else "text", at))
        elif kind == "input_image":
            images.append(_image(part, at))
        else:
            raise SurfaceError(f"{at}.type: content of type '{kind}' is not supported", at)
    return "".join(texts), images or None


def _image(part: dict[str, Any], where: str) -> str:
    url = part.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:"):
        # never fetched for a client (SSRF); file ids need storage we do not have
        raise SurfaceError(
            f"{where}.image_url: send the image inline as a 'data:image/...;base64,' URL",
            f"{where}.image_url",
        )
    header, _, data = url.partition(",")
    media = header[5:].split(";")
    valid = media[0].startswith("image/") and "base64" in media[1:] and bool(data)
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise SurfaceError(f"{where}.image_url: not a base64 image data URL", f"{where}.image_url")
    return data


def _arguments(arguments: object, where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise SurfaceError(f"{where}: a JSON object encoded as a string is required", where)
    if not arguments.strip():
        return {}
    try:
        return _arguments_decoder.decode(arguments)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise SurfaceError(f"{where}: not a JSON object", where) from None


def _reasoning_text(item: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in ("content", "summary"):
        for part in item.get(key) or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        if parts:
            break
    return "".join(parts)


# --------------------------------------------------------------------------- responses


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    summary = [{"type": "summary_text", "text": text}] if status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": summary, "status": status}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if text is not None
        else []
    )
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _call_id(call: ChatToolCall, response_id: str, n: int) -> str:
    return call.id or f"call_{response_id.removeprefix('resp_')}_{n}"


def _response(
    response_id: str,
    model: str,
    created: int,
    echo: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": False,
        "truncation": "disabled",
        "usage": usage,
        **echo,
    }


def _status(done_reason: str | None) -> str:
    return "incomplete" if done_reason == "length" else "completed"


def response_body(chunk: ChatChunk, *, response_id: str, model: str, echo: dict[str, Any]) -> bytes:
    """A non-streamed Ollama chat body -> the ``response`` object."""
    output: list[dict[str, Any]] = []
    message = chunk.message
    suffix = response_id.removeprefix("resp_")
    if message is not None and message.thinking:
        output.append(_reasoning_item(f"rs_{suffix}", message.thinking, "completed"))
    calls = (message.tool_calls or []) if message else []
    if message is not None and (message.content or not calls):
        output.append(_message_item(f"msg_{suffix}", message.content, "completed"))
    for n, call in enumerate(calls):
        arguments = _encoder.encode(call.function.arguments).decode()
        call_id = _call_id(call, response_id, n)
        output.append(
            _call_item(f"fc_{suffix}_{n}", call_id, call.function.name, arguments, "completed")
        )
    body = _response(
        response_id,
        model,
        int(time.time()),
        echo,
        status=_status(chunk.done_reason),
        output=output,
        usage=_usage(chunk.prompt_eval_count or 0, chunk.eval_count or 0),
    )
    return _encoder.encode(body)


# --------------------------------------------------------------------------- streaming


class ResponseStreamTranslator:
    """Ollama ``/api/chat`` NDJSON lines -> the Responses ``response.*`` event stream.

    :meth:`opening` sends ``response.created`` and ``response.in_progress``;
    reasoning, message text and function calls each become an output item
    (``output_item.added`` ... ``output_item.done``) with their deltas; the
    final line closes the open item and sends ``response.completed`` (or
    ``response.incomplete`` when Ollama stopped on length) with the usage.
    A failure is ``response.failed``.
    """

    __slots__ = (
        "_created",
        "_echo",
        "_id",
        "_model",
        "_open",
        "_output",
        "_sequence",
        "_suffix",
        "_text",
        "_tool_calls",
        "completion_tokens",
        "content_chunks",
        "failed",
        "finished",
        "prompt_tokens",
    )

    def __init__(self, response_id: str, model: str, echo: dict[str, Any]) -> None:
        self._id = response_id
        self._suffix = response_id.removeprefix("resp_")
        self._model = model
        self._echo = echo
        self._created = int(time.time())
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # finished items
        self._open: Literal["reasoning", "message"] | None = None
        self._text: list[str] = []  # of the open item
        self._tool_calls = 0
        self.finished = False
        self.failed = False
        self.content_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"

    def _response(self, status: str, usage: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        return _response(
            self._id,
            self._model,
            self._created,
            self._echo,
            status=status,
            output=list(self._output),
            usage=usage,
            **extra,
        )

    def opening(self) -> bytes:
        """``response.created`` and ``response.in_progress``."""
        response = self._response("in_progress", None)
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def ping(self) -> bytes:
        """An SSE comment: clients ignore it, idle timeouts see traffic."""
        return b"" if self.finished else b": keep-alive\n\n"

    def feed_line(self, line: bytes) -> bytes:
        """Decode one Ollama NDJSON line and translate it (a blank line gives ``b""``)."""
        if not line.strip():
            return b""
        return self.feed(decode_chat_chunk(line))

    def fail(self, message: str) -> bytes:
        """End the stream with ``response.failed``."""
        if self.finished:
            return b""
        self.finished = self.failed = True
        error = {"code": "server_error", "message": message}
        return self._event("response.failed", response=self._response("failed", None, error=error))

    def refused(self, status: int, code: str, message: str) -> bytes:
        """A request refused after its stream started (it waited for a slot, then none came).

        ``response.created`` first (the SDK's stream helper expects it), then
        ``response.failed`` with ``code`` (``server_error`` for a 5xx).
        """
        if self.finished:
            return b""
        opening = self.opening()
        self.finished = self.failed = True
        error = {"code": "server_error" if status >= 500 else code, "message": message}
        failed = self._response("failed", None, error=error)
        return opening + self._event("response.failed", response=failed)

    # -- items --------------------------------------------------------------------

    def _index(self) -> int:
        return len(self._output)

    def _item_id(self) -> str:
        return f"{'rs' if self._open == 'reasoning' else 'msg'}_{self._suffix}_{self._index()}"

    def _start(self, kind: Literal["reasoning", "message"]) -> bytes:
        if self._open == kind:
            return b""
        out = self._close()
        self._open = kind
        self._text = []
        item_id, index = self._item_id(), self._index()
        if kind == "reasoning":
            item = _reasoning_item(item_id, "", "in_progress")
            summary_part = {"type": "summary_text", "text": ""}
            return (
                out
                + self._event("response.output_item.added", output_index=index, item=item)
                + self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    part=summary_part,
                )
            )
        item = _message_item(item_id, None, "in_progress")
        part: dict[str, Any] = {
            "type": "output_text",
            "text": "",
            "annotations": [],
            "logprobs": [],
        }
        return (
            out
            + self._event("response.output_item.added", output_index=index, item=item)
            + self._event(
                "response.content_part.added",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=part,
            )
        )

    def _delta(self, text: str) -> bytes:
        self._text.append(text)
        item_id, index = self._item_id(), self._index()
        if self._open == "reasoning":
            return self._event(
                "response.reasoning_summary_text.delta",
                item_id=item_id,
                output_index=index,
                summary_index=0,
                delta=text,
            )
        return self._event(
            "response.output_text.delta",
            item_id=item_id,
            output_index=index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        text = "".join(self._text)
        item_id, index = self._item_id(), self._index()
        if self._open == "reasoning":
            item = _reasoning_item(item_id, text, "completed")
            part = {"type": "summary_text", "text": text}
            out = self._event(
                "response.reasoning_summary_text.done",
                item_id=item_id,
                output_index=index,
                summary_index=0,
                text=text,
            ) + self._event(
                "response.reasoning_summary_part.done",
                item_id=item_id,
                output_index=index,
                summary_index=0,
                part=part,
            )
        else:
            item = _message_item(item_id, text, "completed")
            out = self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            ) + self._event(
                "response.content_part.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=item["content"][0],
            )
        out += self._event("response.output_item.done", output_index=index, item=item)
        self._output.append(item)
        self._open = None
        return out

    def _call(self, call: ChatToolCall) -> bytes:
        out = self._close()
        index = self._index()
        item_id = f"fc_{self._suffix}_{index}"
        call_id = _call_id(call, self._id, self._tool_calls)
        self._tool_calls += 1
        name = call.function.name
        arguments = _encoder.encode(call.function.arguments).decode()
        added = _call_item(item_id, call_id, name, "", "in_progress")
        done = _call_item(item_id, call_id, name, arguments, "completed")
        out += self._event("response.output_item.added", output_index=index, item=added)
        out += self._event(
            "response.function_call_arguments.delta",
            item_id=item_id,
            output_index=index,
            delta=arguments,
        )
        out += self._event(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=index,
            arguments=arguments,
        )
        out += self._event("response.output_item.done", output_index=index, item=done)
        self._output.append(done)
        return out

    def feed(self, chunk: ChatChunk) -> bytes:
        """Translate one decoded Ollama chunk into the events to send (maybe none)."""
        if self.finished:
            return b""
        if chunk.error is not None:
            return self.fail(chunk.error)
        out = b""
        message = chunk.message
        if message is not None:
            if message.thinking:
                self.content_chunks += 1
                out += self._start("reasoning") + self._delta(message.thinking)
            if message.content:
                self.content_chunks += 1
                out += self._start("message") + self._delta(message.content)
            for call in message.tool_calls or ():
                self.content_chunks += 1
                out += self._call(call)
        if chunk.done:
            if self._open is None and not self._output:
                out += self._start("message")  # an empty answer is still one message
            out += self._close()
            self.finished = True
            self.prompt_tokens = chunk.prompt_eval_count or 0
            self.completion_tokens = chunk.eval_count or 0
            status = _status(chunk.done_reason)
            usage = _usage(self.prompt_tokens, self.completion_tokens)
            kind = "response.incomplete" if status == "incomplete" else "response.completed"
            out += self._event(kind, response=self._response(status, usage))
        return out
