"""Native stream accounting reads each line as JSON, in any spelling, cut anywhere."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.stream_lines import (
    LineSplitter,
    NativeStreamScan,
    decode_final_counts,
    fold_keys,
)

COMPACT = [
    b'{"message":{"content":"a"},"done":false}\n',
    b'{"message":{"content":"b"},"done":false}\n',
    b'{"done":true,"prompt_eval_count":5,"eval_count":2}\n',
]
SPACED = [
    b'{"message": {"content": "a"}, "done": false}\n',
    b'{"message": {"content": "b"}, "done": false}\n',
    b'{"done": true, "prompt_eval_count": 5, "eval_count": 2}\n',
]
PRETTY_KEYS = [
    b'{"Message": {"Content": "a"}}\n',
    b'{"Message": {"Content": "b"}}\n',
    b'{ "Done" : true , "Prompt_Eval_Count" : 5 , "EVAL_COUNT" : 2.0 }\n',
]


def _scan(data: bytes, size: int) -> NativeStreamScan:
    scan = NativeStreamScan()
    for i in range(0, len(data), size):
        scan.feed(data[i : i + size])
    scan.close()
    return scan


@pytest.mark.parametrize("lines", [COMPACT, SPACED, PRETTY_KEYS], ids=["compact", "spaced", "case"])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 4096])
def test_every_spelling_finishes_with_the_upstream_counts(lines: list[bytes], size: int) -> None:
    scan = _scan(b"".join(lines), size)
    assert scan.final is not None
    assert (scan.final.prompt_eval_count, scan.final.eval_count) == (5, 2)
    assert (scan.lines, scan.error) == (3, None)


def test_a_stream_without_final_newline_still_finishes() -> None:
    scan = _scan(b"".join(SPACED).rstrip(b"\n"), 4096)
    assert scan.final is not None and scan.final.eval_count == 2


def test_generated_text_that_looks_like_a_final_line_does_not_finish() -> None:
    fake = b'{"message": {"content": "{\\"done\\": true}"}, "done": false}\n'
    scan = _scan(fake * 3, 7)
    assert scan.final is None
    assert scan.lines == 3


def test_error_lines_in_any_spelling_are_errors_not_tokens() -> None:
    for line in (
        b'{"error": "boom"}\n',
        b'{"Error":"boom"}\n',
        b'{"error": {"message": "boom"}}\n',
    ):
        scan = _scan(SPACED[0] + line, 3)
        assert (scan.error, scan.final, scan.lines) == ("boom", None, 1)


def test_line_splitter_carries_partial_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b":1}\n{") == [b'{"a":1}']
    assert splitter.feed(b'"b":2}\n\n') == [b'{"b":2}', b""]
    assert splitter.rest() == b""
    splitter.feed(b"tail")
    assert splitter.rest() == b"tail"


def test_decode_final_counts_of_a_body_folds_keys_and_tolerates_floats() -> None:
    counts = decode_final_counts(b'{"Done": true, "prompt_eval_count": 3.0, "Eval_Count": 9}')
    assert counts is not None
    assert (counts.done, counts.prompt_eval_count, counts.eval_count) == (True, 3, 9)
    assert decode_final_counts(b"[1, 2]") is None
    assert decode_final_counts(b"not json") is None
    assert fold_keys({"A": [{"B": 1}]}) == {"a": [{"b": 1}]}


_ODD_LINES = [
    b'{"message":{"content":"a"},"done":false}\n',
    b"   \n",  # blank: no token
    b"not json at all\n",  # passed through, counted
    b'{"eval_count":1.5}\n',  # a float count: the tolerant decode
    b'{"error":"boom"}\n',
    b'{"done":true,"prompt_eval_count":5,"eval_count":2}\n',
]


@pytest.mark.parametrize(
    "stream",
    [COMPACT, SPACED, PRETTY_KEYS, _ODD_LINES, _ODD_LINES[:4], [b"\n", b"\n"]],
    ids=["compact", "spaced", "case", "odd", "odd-unfinished", "blank"],
)
def test_one_line_per_read_scans_as_any_other_cut(stream: list[bytes]) -> None:
    """The one-whole-line read (each chunk as Ollama flushes it) has a fast path of its own:
    it must come out exactly as the same bytes cut anywhere else."""
    per_line = NativeStreamScan()
    for line in stream:
        per_line.feed(line)
    per_line.close()
    data = b"".join(stream)
    for size in (1, 3, len(data)):
        other = _scan(data, size)
        assert (per_line.lines, per_line.final, per_line.error) == (
            other.lines,
            other.final,
            other.error,
        )
