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

Caps policy (stated in scope-docs/SPEC.md by the lead): ``num_ctx`` and
``num_predict`` are clamped to the cap (a missing or unbounded
``num_predict`` becomes the cap); a forbidden ``keep_alive`` (zero: unload,
negative: pin forever, or unreadable) is refused with 400 naming the option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from neuronetz_gateway.domain.identity import Allowance, OptionCaps
from neuronetz_gateway.domain.stream_lines import FinalCounts, decode_final_counts

__all__ = [
    "CHARS_PER_TOKEN",
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
    "keep_alive_seconds",
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
    if max_output is not None and max_output >= 0:
        return OutputPlan(output=max_output, forward_cap=False)
    if room is None:
        return OutputPlan(output=default_max, forward_cap=False)
    return OutputPlan(output=max(1, min(default_max, room - prompt_estimate)), forward_cap=True)


def native_num_predict(body: dict[str, Any]) -> int | None:
    """``options.num_predict`` of a native body when it is a number, else ``None``."""
    options = body.get("options")
    if not isinstance(options, dict):
        return None
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


# caps -------------------------------------------------------------------------


class CapRefusal(ValueError):
    """An option the key may not set; ``param`` names it (400 in the dialect)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def capped_num_predict(requested: int | None, cap: int | None) -> int | None:
    """Clamp an output cap: ``None``/negative (unbounded) or above ``cap`` becomes ``cap``."""
    if cap is None:
        return requested
    if requested is None or requested < 0 or requested > cap:
        return cap
    return requested


def _number(options: dict[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CapRefusal(f"options.{name}", f"options.{name} must be a number")
    return int(value)


def apply_native_caps(body: dict[str, Any], caps: OptionCaps) -> bool:
    """Apply ``caps`` to a native body in place; return whether it changed.

    Raises :class:`CapRefusal` for a ``keep_alive`` the key may not set or a
    capped option that is not a number.
    """
    changed = False
    if not caps.allow_keep_alive_override and "keep_alive" in body:
        _check_keep_alive(body["keep_alive"])
    if caps.max_num_ctx is None and caps.max_num_predict is None:
        return False
    options = body.get("options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        raise CapRefusal("options", "options must be an object")
    if caps.max_num_ctx is not None:
        num_ctx = _number(options, "num_ctx")
        if num_ctx is not None and num_ctx > caps.max_num_ctx:
            options["num_ctx"] = caps.max_num_ctx
            changed = True
    if caps.max_num_predict is not None:
        requested = _number(options, "num_predict")
        capped = capped_num_predict(requested, caps.max_num_predict)
        if capped != requested or "num_predict" not in options:
            options["num_predict"] = capped
            changed = True
    if changed:
        body["options"] = options
    return changed


def _check_keep_alive(value: Any) -> None:
    if value is None:
        return
    seconds = keep_alive_seconds(value)
    if seconds is None or seconds <= 0:
        raise CapRefusal(
            "keep_alive",
            "keep_alive may not unload (0) or pin (negative) a shared model with this key",
        )


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go's spelling of microseconds (micro sign)
    "μs": 1e-6,  # the Greek mu, which Go also accepts
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def keep_alive_seconds(value: Any) -> float | None:
    """``keep_alive`` as Ollama reads it, in seconds; ``None`` when it is unreadable.

    A JSON number is seconds; a string is a Go duration (``"5m"``, ``"1h30m"``,
    ``"-1m"``, ``"0"``). Negative means "forever" to Ollama.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if text == "0":
        return 0.0
    if not text:
        return None
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


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


class PromptRow(msgspec.Struct, frozen=True):
    """One ``prompt_log`` row, only for keys that opted in."""

    request_id: str
    tenant_id: int
    key_id: int
    created_at: datetime
    expires_at: datetime
    request_text: str
    response_text: str
