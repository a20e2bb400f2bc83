"""Error bodies in the dialect of the surface a client called. Pure.

``/api/*`` (Ollama's native API) answers ``{"error": "<message>"}``;
``/v1/*`` (the OpenAI surface) answers OpenAI's error object
``{"error": {"message", "type", "code", "param"}}``, which the official
``openai`` client turns into its typed exceptions by status.

Both services use these builders, so a refusal from auth (through Caddy) and
one from the proxy read the same to the client.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "NATIVE",
    "OPENAI",
    "Surface",
    "error_body",
    "error_type",
    "surface_of",
]

Surface = Literal["native", "openai"]
NATIVE: Surface = "native"
OPENAI: Surface = "openai"

_encoder = msgspec.json.Encoder()

# OpenAI's `type` values as its API sends them, by the code we answer with.
_TYPE_BY_CODE = {
    "rate_limit_exceeded": "requests",
    "budget_exceeded": "insufficient_quota",
}


def surface_of(path: str) -> Surface:
    """``openai`` for ``/v1`` and below, ``native`` for everything else."""
    return OPENAI if path == "/v1" or path.startswith("/v1/") else NATIVE


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
    code: str
    param: str | None = None


class _OpenAIBody(msgspec.Struct):
    error: _OpenAIError


class _NativeBody(msgspec.Struct):
    error: str


class _NativeLimitBody(msgspec.Struct):
    """A native refusal by a limit: Ollama's ``error`` plus which limit (SPEC section 5)."""

    error: str
    code: str
    limit: str


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

    ``path_or_surface`` is either ``"native"``/``"openai"`` or the request
    path (``/v1/...`` → OpenAI's object, anything else → ``{"error": ...}``).
    ``limit`` (a refusal by a limit: ``rpm``, ``daily_tokens``, ...) makes the
    native body ``{"error", "code", "limit"}``; OpenAI's object names the kind
    in ``code`` and the limit in its message.
    """
    if path_or_surface in (NATIVE, OPENAI):
        surface = path_or_surface
    else:
        surface = surface_of(path_or_surface)
    if surface == OPENAI:
        detail = _OpenAIError(
            message=message, type=error_type(status, code), code=code, param=param
        )
        return _encoder.encode(_OpenAIBody(error=detail))
    if limit is not None:
        return _encoder.encode(_NativeLimitBody(error=message, code=code, limit=limit))
    return _encoder.encode(_NativeBody(error=message))
