"""What the simulator answers: deterministic text, token counts, JSON and vectors.

Everything here is a pure function of its inputs (bar :func:`timestamp`), so
tests can compute the simulator's answers themselves.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import msgspec

__all__ = [
    "EMBEDDING_DIMENSIONS",
    "PROMPT_OVERHEAD",
    "WORDS",
    "apply_stop",
    "count_words",
    "embedding_vector",
    "example_value",
    "json_document",
    "simulated_pieces",
    "simulated_text",
    "split_text",
    "timestamp",
]

#: Tokens a prompt costs beyond its words (Ollama's template adds some).
PROMPT_OVERHEAD = 4
#: The "tokens" of every simulated answer, cycled.
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
EMBEDDING_DIMENSIONS = 8

_encode = msgspec.json.Encoder().encode


def simulated_pieces(n: int) -> list[str]:
    """The ``n`` token texts of a plain simulated answer."""
    return [WORDS[i % len(WORDS)] for i in range(n)]


def simulated_text(n: int) -> str:
    """The full text of a plain simulated answer of ``n`` chunks."""
    return "".join(simulated_pieces(n))


def embedding_vector(model: str, text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector derived from a hash of model and text (what ``/api/embed`` returns)."""
    digest = hashlib.shake_256(f"{model}\0{text}".encode()).digest(dimensions)
    raw = [(b - 127.5) / 127.5 for b in digest]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def count_words(*texts: str | None) -> int:
    return sum(len(t.split()) for t in texts if t)


def example_value(name: str, schema: Any) -> Any:
    """A value satisfying a (simple) JSON schema: what a model "fills in"."""
    if not isinstance(schema, dict):
        return "text"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {key: example_value(key, sub) for key, sub in props.items()}
    if kind == "array":
        return [example_value(name, schema.get("items"))]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    lowered = name.lower()
    if any(word in lowered for word in ("city", "location", "place")):
        return "Paris"
    return "text"


def json_document(fmt: str | dict[str, Any]) -> str:
    if isinstance(fmt, dict):
        return _encode(example_value("", fmt)).decode()
    return _encode({"answer": simulated_text(5)}).decode()


def split_text(text: str, n: int) -> list[str]:
    """``text`` in ``min(n, len(text))`` non-empty consecutive pieces."""
    n = max(1, min(n, len(text)))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def apply_stop(pieces: list[str], stop: str | list[str] | None) -> tuple[list[str], bool]:
    """Cut the pieces at the first stop string; (pieces, whether it stopped)."""
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    if not stops:
        return pieces, False
    text = "".join(pieces)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return pieces, False
    out: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) >= cut:
            if cut > used:
                out.append(piece[: cut - used])
            break
        out.append(piece)
        used += len(piece)
    return out, True


def timestamp(offset_s: float = 0.0) -> str:
    ns = time.time_ns() + int(offset_s * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"
