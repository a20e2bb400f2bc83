"""Reading Ollama's NDJSON as JSON, whatever its spelling. Pure.

- :class:`LineSplitter`: complete lines out of arbitrary reads (a line may be
  split across any number of them);
- :class:`FinalCounts` / :func:`decode_final_counts`: the counts of Ollama's
  final chunk, or its error;
- :class:`NativeStreamScan`: follows a native stream line by line and knows
  when it finished and what it cost.

Every line is decoded as JSON: ``{"done": true}`` (with a space, as servers
built on Python's ``json`` write it) finishes a stream exactly as Ollama's
compact ``{"done":true}`` does. Go's decoder, which Ollama's own clients use,
matches keys case-insensitively, so a body whose keys come in another case
(``"Done"``, ``"Eval_Count"``) is read the same way: the fast typed decode
first, the key-folding one only when the typed one found nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "FinalCounts",
    "LineSplitter",
    "NativeStreamScan",
    "decode_final_counts",
    "fold_keys",
]

_any_decoder = msgspec.json.Decoder()


class LineSplitter:
    """Cuts a byte stream into complete lines; a partial last line waits for the next read."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the pieces of an incomplete last line

    def feed(self, data: bytes) -> list[bytes]:
        """The lines that ``data`` completes (without their ``\\n``; maybe none)."""
        cut = data.rfind(b"\n")
        if cut < 0:
            if data:
                self._parts.append(data)
            return []
        if self._parts:
            self._parts.append(data[:cut])
            block = b"".join(self._parts)
            self._parts.clear()
        else:
            block = data[:cut]
        if cut + 1 < len(data):
            self._parts.append(data[cut + 1 :])
        return block.split(b"\n")

    def __bool__(self) -> bool:
        """Whether part of a line is waiting."""
        return bool(self._parts)

    def rest(self) -> bytes:
        """What is left after the last newline (the stream ended without one)."""
        rest = b"".join(self._parts)
        self._parts.clear()
        return rest


def fold_keys(value: Any) -> Any:
    """``value`` with every object key lower-cased, as Go's decoder would match them."""
    if isinstance(value, dict):
        return {str(k).lower(): fold_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fold_keys(v) for v in value]
    return value


class FinalCounts(msgspec.Struct):
    """A view of an Ollama NDJSON line: only the final-chunk counts and an error."""

    done: bool = False
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None

    def empty(self) -> bool:
        """Nothing the view knows about was in the line."""
        return (
            not self.done
            and self.error is None
            and self.prompt_eval_count is None
            and self.eval_count is None
        )


_counts_decoder = msgspec.json.Decoder(FinalCounts)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _error_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return str(value["message"])  # some compatible servers nest it, OpenAI-style
    return msgspec.json.encode(value).decode()


def _loose_counts(line: bytes) -> FinalCounts | None:
    """The counts view read key-insensitively and type-tolerantly."""
    try:
        value = _any_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    folded = {str(k).lower(): v for k, v in value.items()}
    return FinalCounts(
        done=folded.get("done") is True,
        prompt_eval_count=_count(folded.get("prompt_eval_count")),
        eval_count=_count(folded.get("eval_count")),
        error=_error_text(folded.get("error")),
    )


def decode_final_counts(line: bytes, *, strict: bool = False) -> FinalCounts | None:
    """The counts view of one line or body; ``None`` when it is not a JSON object.

    ``strict`` skips the key-folding retry for a line that named none of the
    fields (the streaming hot path: a content line names none of them).
    """
    try:
        counts = _counts_decoder.decode(line)
    except msgspec.ValidationError:
        return _loose_counts(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not strict and counts.empty():
        return _loose_counts(line) or counts
    return counts


class NativeStreamScan:
    """Follows a native NDJSON stream across reads, decoding each complete line.

    ``final`` is the final chunk's counts once a line with ``done: true``
    arrived; ``error`` an error line's text; ``lines`` counts the lines that
    carried a chunk (one generated token each, for a stream cut off early;
    the final line counts, an error line does not).
    """

    __slots__ = ("_last", "_splitter", "error", "final", "lines")

    def __init__(self) -> None:
        self._splitter = LineSplitter()
        self._last = b""  # the last non-blank line, re-read key-insensitively at the end
        self.lines = 0
        self.final: FinalCounts | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        """Take the next read."""
        cut = data.find(b"\n")
        if cut < 0 or cut != len(data) - 1 or self._splitter._parts:
            for line in self._splitter.feed(data):
                self._line(line)
            return
        # The usual read: exactly one whole line (Ollama flushes per chunk): no splitter.
        self._line(data)

    def close(self) -> None:
        """The stream ended: a last line without a newline still counts."""
        rest = self._splitter.rest()
        if rest:
            self._line(rest)
        if self.final is None and self.error is None and self._last:
            counts = _loose_counts(self._last)
            if counts is not None:
                self._take(counts)

    def _line(self, line: bytes) -> None:
        counts: FinalCounts | None
        try:
            counts = _counts_decoder.decode(line)
        except msgspec.ValidationError:
            counts = _loose_counts(line)
        except (msgspec.DecodeError, RecursionError):
            if not line or line.isspace():
                return
            counts = None  # not JSON: passed through, counted as what it produced
        self._last = line
        self.lines += 1
        if counts is not None and (counts.done or counts.error is not None):
            self._take(counts)

    def _take(self, counts: FinalCounts) -> None:
        if self.final is not None or self.error is not None:
            return
        if counts.error is not None:
            self.error = counts.error
            self.lines -= 1  # an error line carries no generated token
        elif counts.done:
            self.final = counts
