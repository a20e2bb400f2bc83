"""The Ollama options that bound GPU work, read as Ollama reads them, before any cap. Pure.

Ollama's ``Options.FromMap`` takes an integer option from JSON as Go's
``float64`` and converts it with ``int64(v)``, which truncates toward zero:
``num_predict`` ``0.5`` and ``1e-9`` arrive as ``0``, and ``1e300``
overflows into a negative number. To Ollama a ``num_predict`` of 0 or below
means "no limit". So the gateway reads every such value the same way first
(:func:`output_limit`, :func:`context_size`), and only then caps, plans and
reserves: a value that Ollama would read as unbounded is unbounded here too.

``keep_alive`` (how long a shared model stays loaded) is read with
:func:`neuronetz_gateway.domain.durations.keep_alive_nanoseconds` and, for a
key that may not override it, must fall inside a window (:func:`check_keep_alive`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neuronetz_gateway.domain.durations import KEEP_FOREVER, DurationError, keep_alive_nanoseconds

__all__ = [
    "MAX_OUTPUT_TOKENS",
    "KeepAliveWindow",
    "OptionError",
    "check_keep_alive",
    "context_size",
    "go_integer",
    "output_limit",
]

#: The largest output bound honoured as a bound (the cap columns are int32 too);
#: anything larger is no bound at all for a model.
MAX_OUTPUT_TOKENS = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OptionError(ValueError):
    """An option value the gateway refuses; ``param`` names it (a 400 in the dialect)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def go_integer(param: str, value: object) -> int | None:
    """An integer option as Ollama reads it: ``int64(float64(v))``; ``None`` if absent.

    ``None`` too for a value whose conversion overflows int64 (Go leaves the
    result undefined; on amd64 it is the most negative int64). A value that
    is not a number is refused, as Ollama refuses it.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(param, f"{param} must be a number")
    number = float(value)
    if not math.isfinite(number):
        return None
    whole = math.trunc(number)
    if not _INT64_MIN <= whole <= _INT64_MAX:
        return None
    return whole


def output_limit(param: str, value: object) -> int | None:
    """The output bound ``num_predict`` (or ``max_tokens``) sets; ``None`` = unbounded.

    Unbounded: absent, read by Ollama as below 1 (``0``, ``0.5``, ``1e-9``,
    ``-1``, ``-2``), overflowing, or above :data:`MAX_OUTPUT_TOKENS`.
    """
    whole = go_integer(param, value)
    if whole is None or whole < 1 or whole > MAX_OUTPUT_TOKENS:
        return None
    return whole


def context_size(param: str, value: object) -> int | None:
    """The context ``num_ctx`` asks for; ``None`` = the server's default.

    A value Ollama would read as below 1 (or that overflows) asks for no
    particular size, so it is treated like an absent one.
    """
    whole = go_integer(param, value)
    if whole is None or whole < 1:
        return None
    return whole


@dataclass(frozen=True, slots=True)
class KeepAliveWindow:
    """How long a key that may not override ``keep_alive`` may keep a model loaded."""

    min_seconds: float
    max_seconds: float


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:g}s"


def check_keep_alive(value: object, window: KeepAliveWindow) -> None:
    """Refuse (:class:`OptionError`) a ``keep_alive`` outside ``window``.

    ``null`` is the server's default and passes. Everything else is read as
    Ollama reads it: ``0``, ``0.5`` and ``"1ns"`` unload the model at once,
    negative values and ``"999999h"`` pin it, ``1e300`` overflows.
    """
    try:
        ns = keep_alive_nanoseconds(value)
    except DurationError as exc:
        raise OptionError("keep_alive", f"keep_alive is not readable: {exc}") from None
    if ns is None:
        return
    low, high = window.min_seconds * 1e9, window.max_seconds * 1e9
    if low <= ns <= high:
        return
    got = "forever" if ns == KEEP_FOREVER else _seconds(ns)
    raise OptionError(
        "keep_alive",
        f"keep_alive must be between {window.min_seconds:g}s and {window.max_seconds:g}s "
        f"for this key (it keeps a shared model loaded for {got})",
    )
