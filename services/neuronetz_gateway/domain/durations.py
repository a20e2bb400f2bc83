"""Go's ``time.ParseDuration`` and Ollama's reading of ``keep_alive``. Pure.

Ollama decodes ``keep_alive`` (``api.Duration.UnmarshalJSON``) as:

- a JSON number: seconds, truncated to a whole number (``0.5`` is ``0``:
  unload now); a negative number means "keep forever";
- a string: Go's ``time.ParseDuration`` (``"5m"``, ``"1h30m"``, ``"1ns"``,
  ``"-1m"``); a negative duration means "keep forever"; an unreadable one is
  an error;
- ``null``: not set (the server's default).

:func:`parse_go_duration` follows Go's algorithm byte for byte (no spaces, a
unit on every number except a bare ``"0"``, int64 nanoseconds with overflow
an error), so what the gateway checks is what Ollama will do.
"""

from __future__ import annotations

import math

__all__ = [
    "KEEP_FOREVER",
    "DurationError",
    "keep_alive_nanoseconds",
    "parse_go_duration",
]

_INT64_MAX = 2**63 - 1
_NS_PER_SECOND = 1_000_000_000
#: What Ollama stores for a negative ``keep_alive``: ``time.Duration(math.MaxInt64)``.
KEEP_FOREVER = _INT64_MAX

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": _NS_PER_SECOND,
    "m": 60 * _NS_PER_SECOND,
    "h": 3600 * _NS_PER_SECOND,
}
_DIGITS = frozenset("0123456789")


class DurationError(ValueError):
    """Not a duration Go would read."""


def _leading_int(s: str) -> tuple[int, str]:
    value, i = 0, 0
    while i < len(s) and s[i] in _DIGITS:
        if value > 2**63 // 10:
            raise DurationError("duration overflows")
        value = value * 10 + ord(s[i]) - 48
        if value > 2**63:
            raise DurationError("duration overflows")
        i += 1
    return value, s[i:]


def _leading_fraction(s: str) -> tuple[int, float, str]:
    value, scale, i, overflow = 0, 1.0, 0, False
    while i < len(s) and s[i] in _DIGITS:
        if not overflow:
            if value > (_INT64_MAX // 10):
                overflow = True  # Go stops accumulating, keeps consuming
            else:
                nxt = value * 10 + ord(s[i]) - 48
                if nxt > 2**63:
                    overflow = True
                else:
                    value, scale = nxt, scale * 10
        i += 1
    return value, scale, s[i:]


def parse_go_duration(text: str) -> int:
    """Nanoseconds, as Go's ``time.ParseDuration`` reads ``text``; :class:`DurationError` else."""
    s = text
    negative = False
    if s and s[0] in "+-":
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"invalid duration {text!r}")
    total = 0
    while s:
        if not (s[0] == "." or s[0] in _DIGITS):
            raise DurationError(f"invalid duration {text!r}")
        before = len(s)
        whole, s = _leading_int(s)
        pre = before != len(s)
        fraction, scale, post = 0, 1.0, False
        if s and s[0] == ".":
            s = s[1:]
            before = len(s)
            fraction, scale, s = _leading_fraction(s)
            post = before != len(s)
        if not pre and not post:
            raise DurationError(f"invalid duration {text!r}")
        i = 0
        while i < len(s) and not (s[i] == "." or s[i] in _DIGITS):
            i += 1
        if i == 0:
            raise DurationError(f"missing unit in duration {text!r}")
        unit_name, s = s[:i], s[i:]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise DurationError(f"unknown unit {unit_name!r} in duration {text!r}")
        if whole > 2**63 // unit:
            raise DurationError(f"invalid duration {text!r}")
        whole *= unit
        if fraction > 0:
            whole += int(float(fraction) * (float(unit) / scale))
            if whole > 2**63:
                raise DurationError(f"invalid duration {text!r}")
        total += whole
        if total > 2**63:
            raise DurationError(f"invalid duration {text!r}")
    if negative:
        return -total
    if total > _INT64_MAX:
        raise DurationError(f"invalid duration {text!r}")
    return total


def keep_alive_nanoseconds(value: object) -> int | None:
    """``keep_alive`` as Ollama will hold the model, in nanoseconds.

    :data:`KEEP_FOREVER` for the negative values that pin a model; ``None``
    for ``null`` (the server's default). :class:`DurationError` for what
    Ollama cannot read, and for numbers whose conversion overflows Go's int64
    (``1e300``), whose result Ollama does not define.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise DurationError("keep_alive must be a number of seconds or a duration string")
    if isinstance(value, int | float):
        number = float(value)  # Go decodes every JSON number as float64
        if math.isnan(number):
            raise DurationError("keep_alive must be a finite number")
        if number < 0:
            return KEEP_FOREVER
        seconds = math.trunc(number) if math.isfinite(number) else None
        if seconds is None or seconds * _NS_PER_SECOND > _INT64_MAX:
            raise DurationError("keep_alive is too large")
        return seconds * _NS_PER_SECOND
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return KEEP_FOREVER if ns < 0 else ns
    raise DurationError("keep_alive must be a number of seconds or a duration string")
