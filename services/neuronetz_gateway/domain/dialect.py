"""Error bodies in the dialect of the surface a client called. Pure.

``/api/*`` (Ollama's native API) answers ``{"error": "<message>"}``;
``/v1/*`` (the OpenAI surface) answers OpenAI's error object
``{"error": {"message", "type", "code", "param"}}``, which the official
``openai`` client turns into its typed exceptions by status;
``/v1/messages`` and below (Anthropic's Messages API) answer
``{"type": "error", "error": {"type", "message"}}``, the type chosen by
status, which the ``anthropic`` client turns into its typed exceptions.

Both services use these builders, so a refusal from auth (through Caddy) and
one from the proxy read the same to the client. They are the one encoder per
dialect: :func:`openai_error_body` (also inside OpenAI's stream error events,
``domain/openai_compat.py``), :func:`error_body` for all three (Anthropic's
stream error events, ``domain/anthropic_compat.py``, and native's mid-stream
error line, ``proxy/relay.py``, use it too).
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "ANTHROPIC",
    "NATIVE",
    "OPENAI",
    "Surface",
    "anthropic_error_type",
    "error_body",
    "error_type",
    "openai_error_body",
    "surface_of",
]

Surface = Literal["native", "openai", "anthropic"]
NATIVE: Surface = "native"
OPENAI: Surface = "openai"
ANTHROPIC: Surface = "anthropic"
_SURFACES = (NATIVE, OPENAI, ANTHROPIC)

_encoder = msgspec.json.Encoder()

# OpenAI's `type` values as its API sends them, by the code we answer with.
_TYPE_BY_CODE = {
    "rate_limit_exceeded": "requests",
    "budget_exceeded": "insufficient_quota",
}


def surface_of(path: str) -> Surface:
    """``anthropic`` for ``/v1/messages`` and below, ``openai`` for the rest of ``/v1``,
    ``native`` for everything else."""
    if path == "/v1" or path.startswith("/v1/"):
        if path == "/v1/messages" or path.startswith("/v1/messages/"):
            return ANTHROPIC
        return OPENAI
    return NATIVE


def error_type(status: int, code: str) -> str:
    """OpenAI's ``type`` field for an error with ``status`` and ``code``."""
    if code in _TYPE_BY_CODE:
        return _TYPE_BY_CODE[code]
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class _OpenAIError(msgspec.Struct):
    message: str
    type: str
    code: str | None
    param: str | None = None


class _OpenAIBody(msgspec.Struct):
    error: _OpenAIError


# Anthropic's error `type` by status (any other 4xx: invalid_request_error, 5xx: api_error).
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    if status in _ANTHROPIC_TYPE_BY_STATUS:
        return _ANTHROPIC_TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class _AnthropicError(msgspec.Struct):
    type: str
    message: str


class _AnthropicBody(msgspec.Struct, tag="error", tag_field="type"):
    error: _AnthropicError


class _NativeBody(msgspec.Struct):
    error: str


class _NativeLimitBody(msgspec.Struct):
    """A native refusal by a limit: Ollama's ``error`` plus which limit (SPEC section 5)."""

    error: str
    code: str
    limit: str


def openai_error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """OpenAI's error object: ``{"error": {"message", "type", "code", "param"}}``."""
    return _encoder.encode(_OpenAIBody(error=_OpenAIError(message, error_type, code, param)))


def error_body(
    path_or_surface: str,
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    limit: str | None = None,
) -> bytes:
    """The JSON error body for ``status`` in the dialect of a path (or a named surface).

    ``path_or_surface`` is a surface's name or the request path (see
    :func:`surface_of`). ``limit`` (a refusal by a limit: ``rpm``,
    ``daily_tokens``, ...) makes the native body ``{"error", "code",
    "limit"}``; OpenAI's and Anthropic's objects name it in the message.
    """
    known = path_or_surface in _SURFACES
    surface = path_or_surface if known else surface_of(path_or_surface)
    if surface == OPENAI:
        return openai_error_body(
            message, error_type=error_type(status, code), code=code, param=param
        )
    if surface == ANTHROPIC:
        kind = anthropic_error_type(status)
        return _encoder.encode(_AnthropicBody(error=_AnthropicError(type=kind, message=message)))
    if limit is not None:
        return _encoder.encode(_NativeLimitBody(error=message, code=code, limit=limit))
    return _encoder.encode(_NativeBody(error=message))
