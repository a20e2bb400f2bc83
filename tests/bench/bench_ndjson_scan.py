"""Native stream accounting: the line decoder against the byte-marker scan it replaced.

Run: ``.venv/bin/python tests/bench/bench_ndjson_scan.py [--streams 20000]``

Feeds the same NDJSON streams (the simulator's 20-chunk ``/api/chat``
answer, as Ollama writes it, one read per line, and the same bytes cut into
reads of 64 bytes) to both scanners and prints streams per second of each
and the ratio ``line decoder / marker scan``. A CPU-only microbenchmark: the
proxy's own cost per stream (Granian, the upstream client, Redis, audit) is
around a hundred times larger, see ``bench_proxy_stream.py``. Not collected
by pytest; reports a ratio, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from neuronetz_gateway.domain.stream_lines import NativeStreamScan, decode_final_counts
from neuronetz_gateway.simulator import simulated_pieces

_DONE_MARK = b'"done":true'
_ERROR_MARK = b'{"error"'


class MarkerScan:
    """The scan before the line decoder (relay.NdjsonScan at 0d8e514), kept as the baseline."""

    __slots__ = ("error", "final", "lines", "pending")

    def __init__(self) -> None:
        self.pending = b""
        self.lines = 0
        self.final: object | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        cut = data.rfind(b"\n")
        if cut < 0:
            self.pending += data
            return
        self.lines += data.count(b"\n")
        if self.pending:
            complete = self.pending + data[:cut]
            if _DONE_MARK in complete or _ERROR_MARK in complete:
                self._read_marked(complete)
        elif data.find(_DONE_MARK, 0, cut) >= 0 or data.find(_ERROR_MARK, 0, cut) >= 0:
            self._read_marked(data[:cut])
        self.pending = data[cut + 1 :]

    def close(self) -> None:
        if self.pending.strip():
            self.lines += 1
            self._read_marked(self.pending)
        self.pending = b""

    def _read_marked(self, complete: bytes) -> None:
        for line in complete.split(b"\n"):
            if _DONE_MARK not in line and _ERROR_MARK not in line:
                continue
            counts = decode_final_counts(line, strict=True)
            if counts is None:
                continue
            if counts.error is not None:
                self.error = counts.error
                self.lines -= 1
            elif counts.done:
                self.final = counts


def _stream() -> bytes:
    head = b'{"model":"llama3.2","created_at":"2026-12-02T13:00:00.000000000Z","message":'
    lines = [
        head + b'{"role":"assistant","content":"' + piece.encode() + b'"},"done":false}\n'
        for piece in simulated_pieces(20)
    ]
    lines.append(
        b'{"model":"llama3.2","created_at":"2026-12-02T13:00:00.000000000Z","message":'
        b'{"role":"assistant","content":""},"done_reason":"stop","done":true,'
        b'"total_duration":22100000,"load_duration":1000000,"prompt_eval_count":7,'
        b'"prompt_eval_duration":700000,"eval_count":20,"eval_duration":20000000}\n'
    )
    return b"".join(lines)


def _rate(make: Callable[[], MarkerScan | NativeStreamScan], reads: list[bytes], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        scan = make()
        for data in reads:
            scan.feed(data)
        scan.close()
        assert scan.final is not None
    return n / (time.perf_counter() - start)


def _best_of(reads: list[bytes], n: int, rounds: int = 9) -> tuple[float, float]:
    """Best rate of each scanner, the two measured alternately (a shared machine drifts)."""
    before = after = 0.0
    for _ in range(rounds):
        before = max(before, _rate(MarkerScan, reads, n))
        after = max(after, _rate(NativeStreamScan, reads, n))
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=3_000)
    args = parser.parse_args()
    data = _stream()
    per_line = [line + b"\n" for line in data.split(b"\n")[:-1]]
    cut = [data[i : i + 64] for i in range(0, len(data), 64)]
    for name, reads in (("one read per line", per_line), ("64-byte reads", cut)):
        before, after = _best_of(reads, args.streams)
        print(
            f"{name:>18}: marker scan {before:,.0f} streams/s, line decoder {after:,.0f} "
            f"streams/s, ratio {after / before:.2f} "
            f"({1e6 / after - 1e6 / before:+.1f} us per 21-line stream)"
        )


if __name__ == "__main__":
    main()
