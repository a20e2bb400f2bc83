"""Token accounting for the proxy. Pure.

- :func:`estimate_prompt_tokens` / :func:`estimate_native_prompt`: what a
  prompt will cost before the model has seen it (the reservation's input);
- :func:`plan_output`: how many output tokens to reserve (and to forward as the
  request's cap when the client gave none), within the room budgets and TPM
  leave; the request's maximum is then the prompt estimate + that (its
  output cap, or the configured default when it has none);
- :func:`apply_native_caps` / :func:`capped_num_predict`: per-key caps on the
  Ollama options that cost shared GPU (``num_ctx``, ``num_predict``,
  ``keep_alive``);
- :class:`FinalCounts` / :func:`decode_final_counts`: the counts of Ollama's
  final chunk (from :mod:`.stream_lines`, re-exported);
- :class:`AuditRow` / :class:`PromptRow`: what the audit writer stores.

Caps policy (scope-docs/SPEC.md section 6a): the options are first read as
Ollama reads them (:mod:`neuronetz_gateway.domain.options`), then ``num_ctx``
and ``num_predict`` are clamped to the cap (a missing or unbounded
``num_predict``, which includes 0 and fractions below 1, becomes the cap); a
``keep_alive`` outside the key's window (it would unload or pin a shared
model, or is unreadable) is refused with 400 naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from neuronetz_gateway.domain.identity import Allowance, OptionCaps
from neuronetz_gateway.domain.options import (
    KeepAliveWindow,
    OptionError,
    check_keep_alive,
    context_size,
    output_limit,
)
from neuronetz_gateway.domain.stream_lines import FinalCounts, decode_final_counts

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_KEEP_ALIVE_WINDOW",
    "IMAGE_TOKENS",
    "PER_MESSAGE_TOKENS",
    "PER_REQUEST_TOKENS",
    "AuditRow",
    "CapRefusal",
    "FinalCounts",
    "OutputPlan",
    "PromptRow",
    "apply_native_caps",
    "capped_num_predict",
    "decode_final_counts",
    "estimate_native_prompt",
    "estimate_prompt_tokens",
    "native_num_predict",
    "plan_output",
    "response_text",
    "token_room",
]

#: A rough, deliberately generous ratio: the estimate should not undershoot.
CHARS_PER_TOKEN = 4
#: Template tokens Ollama adds around each chat message and each request.
PER_MESSAGE_TOKENS = 4
PER_REQUEST_TOKENS = 4
#: What one image costs a vision model (CLIP-style encoders: 576..1024 tokens).
IMAGE_TOKENS = 768


def estimate_prompt_tokens(texts: Iterable[str], *, messages: int = 0, images: int = 0) -> int:
    """``ceil(chars / 4)`` plus per-message, per-request and per-image overheads."""
    chars = sum(len(t) for t in texts)
    return (
        math.ceil(chars / CHARS_PER_TOKEN)
        + messages * PER_MESSAGE_TOKENS
        + PER_REQUEST_TOKENS
        + images * IMAGE_TOKENS
    )


_json = msgspec.json.Encoder()


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _count_images(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def estimate_native_prompt(route: str, body: dict[str, Any]) -> int:
    """The prompt estimate of a native ``/api/*`` body (already checked to be an object)."""
    if route == "chat":
        raw = body.get("messages")
        messages = raw if isinstance(raw, list) else []
        texts: list[str] = []
        images = 0
        for message in messages:
            if isinstance(message, dict):
                texts += _texts(message.get("content"))
                images += _count_images(message.get("images"))
        tools = body.get("tools")
        if tools:
            texts.append(_json.encode(tools).decode())
        return estimate_prompt_tokens(texts, messages=len(messages), images=images)
    if route == "generate":
        texts = _texts(body.get("prompt")) + _texts(body.get("system")) + _texts(body.get("suffix"))
        return estimate_prompt_tokens(texts, images=_count_images(body.get("images")))
    if route == "embed":
        inputs = _texts(body.get("input"))
        return estimate_prompt_tokens(inputs, messages=len(inputs))
    if route == "embeddings":
        return estimate_prompt_tokens(_texts(body.get("prompt")))
    return 0


def token_room(allowance: Allowance) -> int | None:
    """The most tokens a request can still be granted; ``None`` when no token limit applies."""
    remaining = [
        value
        for value in (
            allowance.remaining_tokens,
            allowance.remaining_daily_tokens,
            allowance.remaining_monthly_tokens,
            allowance.remaining_total_tokens,
        )
        if value is not None
    ]
    return min(remaining) if remaining else None


class OutputPlan(msgspec.Struct, frozen=True):
    """Output tokens to reserve; ``forward_cap``: send them as the request's own cap."""

    output: int
    forward_cap: bool


def plan_output(
    max_output: int | None, default_max: int, prompt_estimate: int, room: int | None
) -> OutputPlan:
    """The output a request may use, so that what is reserved bounds what is charged.

    A client's own cap (``num_predict``/``max_tokens`` >= 0) is kept: it is
    reserved as asked, and refused if it does not fit. Without one, and when
    a token budget or TPM applies (``room`` is known), the output is
    ``default_max`` shrunk to what the room leaves after the prompt (at least
    1) and forwarded as ``num_predict``: otherwise the model could run past
    the reservation, and a small budget could never be used at all. Without
    any token limit nothing is reserved or forwarded.
    """
    if max_output is not None and max_output >= 1:
        return OutputPlan(output=max_output, forward_cap=False)
    if room is None:
        return OutputPlan(output=default_max, forward_cap=False)
    return OutputPlan(output=max(1, min(default_max, room - prompt_estimate)), forward_cap=True)


def native_num_predict(body: dict[str, Any]) -> int | None:
    """The output bound ``options.num_predict`` of a native body sets; ``None`` = unbounded.

    Read as Ollama reads it (:func:`~neuronetz_gateway.domain.options.output_limit`):
    ``0``, ``0.5``, ``1e-9``, negative and overflowing values are unbounded.
    """
    options = body.get("options")
    if not isinstance(options, dict):
        return None
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return output_limit("options.num_predict", value)


# caps -------------------------------------------------------------------------

#: A refused option (kept under its old name: the proxy catches it as such).
CapRefusal = OptionError
#: The window of a key that may not override ``keep_alive`` when none is configured.
DEFAULT_KEEP_ALIVE_WINDOW = KeepAliveWindow(min_seconds=60.0, max_seconds=86400.0)


def capped_num_predict(requested: int | None, cap: int | None) -> int | None:
    """Clamp a normalised output bound (``None`` = unbounded) to ``cap``.

    ``requested`` comes from :func:`~neuronetz_gateway.domain.options.output_limit`;
    anything below 1 is unbounded to Ollama, so it becomes the cap too.
    """
    if cap is None:
        return requested
    if requested is None or requested < 1 or requested > cap:
        return cap
    return requested


def apply_native_caps(
    body: dict[str, Any],
    caps: OptionCaps,
    keep_alive_window: KeepAliveWindow = DEFAULT_KEEP_ALIVE_WINDOW,
) -> bool:
    """Normalise the GPU-bounding options of a native body, then cap them, in place.

    ``num_predict`` and ``num_ctx`` are read as Ollama reads them (truncated
    to int64; below 1 is "no limit" / "server default") and rewritten as
    plain integers; with a cap, an unbounded ``num_predict`` (absent
    included) becomes the cap and ``num_ctx`` is clamped to it (one below 1
    is dropped: the server's default, as if absent). Returns whether the
    body changed. Raises :class:`CapRefusal` for a ``keep_alive`` outside
    the window of a key that may not override it, or an option that is not
    a number.
    """
    changed = False
    if not caps.allow_keep_alive_override and "keep_alive" in body:
        check_keep_alive(body["keep_alive"], keep_alive_window)
    options = body.get("options")
    if options is None:
        if caps.max_num_predict is None:
            return False
        options = {}
    elif not isinstance(options, dict):
        if caps.max_num_ctx is None and caps.max_num_predict is None:
            return False  # nothing to enforce: Ollama answers it with its own 400
        raise CapRefusal("options", "options must be an object")
    if "num_predict" in options or caps.max_num_predict is not None:
        changed |= _normalise_num_predict(options, caps.max_num_predict)
    if "num_ctx" in options:
        changed |= _normalise_num_ctx(options, caps.max_num_ctx)
    if changed:
        body["options"] = options
    return changed


def _normalise_num_predict(options: dict[str, Any], cap: int | None) -> bool:
    sent = options.get("num_predict")
    limit = capped_num_predict(output_limit("options.num_predict", sent), cap)
    if limit is None or (limit == sent and type(sent) is int):
        return False  # unbounded and uncapped: as sent (the plan may bound it)
    options["num_predict"] = limit
    return True


def _normalise_num_ctx(options: dict[str, Any], cap: int | None) -> bool:
    sent = options["num_ctx"]
    size = context_size("options.num_ctx", sent)
    if size is None:
        if cap is None:
            return False
        del options["num_ctx"]
        return True
    if cap is not None:
        size = min(size, cap)
    if size == sent and type(sent) is int:
        return False
    options["num_ctx"] = size
    return True


# counts -------------------------------------------------------------------------


class _TextView(msgspec.Struct):
    response: str | None = None
    message: dict[str, Any] | None = None


_text_decoder = msgspec.json.Decoder(_TextView)


def response_text(ndjson: bytes) -> str:
    """The answer text of an Ollama body or NDJSON stream (for opted-in prompt logs)."""
    parts: list[str] = []
    for line in ndjson.split(b"\n"):
        if not line.strip():
            continue
        try:
            view = _text_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if view.response:
            parts.append(view.response)
        elif view.message and isinstance(view.message.get("content"), str):
            parts.append(view.message["content"])
    return "".join(parts)


# rows ---------------------------------------------------------------------------


class AuditRow(msgspec.Struct, frozen=True):
    """One ``usage_log`` row: what a request cost and how it ended (no prompt text)."""

    request_id: str
    ts: datetime
    tenant_id: int
    key_id: int
    key_prefix: str
    route: str
    model: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttfb_ms: int | None
    duration_ms: int
    streamed: bool
    client_disconnected: bool
    estimated: bool
    #: ended early because the key was revoked while it ran (spooled rows lack it: False)
    revoked: bool = False


class PromptRow(msgspec.Struct, frozen=True):
    """One ``prompt_log`` row, only for keys that opted in."""

    request_id: str
    tenant_id: int
    key_id: int
    created_at: datetime
    expires_at: datetime
    request_text: str
    response_text: str
