"""Field names that Ollama would read differently from the gateway. Pure.

Go's ``encoding/json`` matches an object key to a struct field
case-insensitively, with Unicode simple folding (``"Content"``,
``"CONTENT"``, and ``"\u212a"`` (Kelvin sign) for ``k``, ``"\u017f"`` (long s) for
``s``, all reach the same field), and the last of several matches wins.
The gateway reads the lower-case spelling only. A body that spells a field
Ollama decodes in another case would be checked and counted as one request
(a short prompt, no images) and run as another (a 12 kB prompt): so such a
body is refused (:func:`case_variant_field`) rather than guessed at.

Checked at every position where Ollama decodes into a Go struct and the
gateway reads or counts something: the top level, each ``messages[i]``,
their ``tool_calls[j]`` and ``function``, each ``tools[i]`` and its
``function``; and the names inside ``options`` (Ollama matches those
exactly, so a case variant would be ignored upstream while looking capped
here). Every Ollama field name is plain lower-case ASCII, so anything else
at those positions can only be a case variant or an unknown field. Maps whose
keys are the client's own (``format`` schemas, tool ``parameters``, tool-call
``arguments``) are not touched.
"""

from __future__ import annotations

from typing import Any

__all__ = ["case_variant_field"]

# position -> the struct-decoded children below it: (is a list of objects, children)
_Shape = dict[str, tuple[bool, "_Shape"]]
_FUNCTION: _Shape = {"function": (False, {})}
_NATIVE_BODY: _Shape = {
    "messages": (True, {"tool_calls": (True, _FUNCTION)}),
    "tools": (True, _FUNCTION),
    "options": (False, {}),
}


def _plain(name: str) -> bool:
    return name.isascii() and name == name.lower()


def _walk(value: Any, shape: _Shape, where: str) -> str | None:
    if not isinstance(value, dict):
        return None
    for name in value:
        if not _plain(name):
            return f"{where}.{name}" if where else name
    for name, (many, inner) in shape.items():
        child = value.get(name)
        path = f"{where}.{name}" if where else name
        if many:
            if isinstance(child, list):
                for i, item in enumerate(child):
                    found = _walk(item, inner, f"{path}[{i}]")
                    if found:
                        return found
        else:
            found = _walk(child, inner, path)
            if found:
                return found
    return None


def case_variant_field(body: dict[str, Any]) -> str | None:
    """The path (``messages[0].Content``) of the first field Ollama could read otherwise.

    ``None`` when every name at a struct position is plain lower-case ASCII.
    """
    return _walk(body, _NATIVE_BODY, "")
