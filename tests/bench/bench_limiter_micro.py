"""The limiter's own Python per admit / reserve / settle, Redis answered in-process.

``--capture FILE`` runs each call once against a private real Redis
(``redis-server`` on PATH) and stores the scripts' replies; without it the
replies stored in FILE (``--replies``) are answered at once by a fake command
channel, so what is timed is only the limiter's Python (keys, ARGV, reply
parsing, the allowance and the decision). Best of ``--rounds`` rounds of
``--calls`` calls, µs per call, one line of JSON::

    python tests/bench/bench_limiter_micro.py --capture /tmp/replies.txt
    python tests/bench/bench_limiter_micro.py --replies /tmp/replies.txt

For an A/B, run it alternately with ``PYTHONPATH`` pointing at each tree's
``services`` (interleaved, several times; compare the medians).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

from neuronetz_gateway.adapters.postgres.store import LedgerTotals
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import Limits

KEY_LIMITS = Limits(rpm=100_000, tpm=10_000_000, concurrency=1000, daily_tokens=10**9)
TENANT_LIMITS = Limits(
    rpm=1_000_000, tpm=100_000_000, daily_tokens=10**10, monthly_tokens=10**11, total_tokens=10**12
)
NOW = 1_796_415_582.0


class _Ledger:
    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        return LedgerTotals(daily=0, monthly=0, total=0)


def _packer() -> Callable[[str, Sequence[Any], Sequence[Any]], bytes]:
    """How this tree's pipelined client encodes EVALSHA."""
    from neuronetz_gateway.adapters import redis_pipeline

    pack = getattr(redis_pipeline, "pack_evalsha", None)
    if pack is not None:
        return cast(Callable[[str, Sequence[Any], Sequence[Any]], bytes], pack)

    def before(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
        # a tree from before pack_evalsha: what its evalsha sent
        return redis_pipeline._pack(("EVALSHA", sha, len(keys), *keys, *args))

    return before


class _Canned:
    """Answers each script by its first ARGV (decide's mode, lease's action) or settle."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.packed = b""
        self._pack = _packer()

    async def execute(self, *args: Any) -> Any:
        return b"OK"

    async def evalsha(self, sha: str, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        # the encoding the pipelined client sends, as this tree builds it
        self.packed = self._pack(sha, keys, args)
        first = args[0]
        return self.replies[first if first in ("admit", "reserve") else "settle"]

    async def aclose(self) -> None:
        pass


async def _calls(limiter: Limiter, n: int) -> dict[str, float]:
    timings: dict[str, float] = {}
    common = {
        "tenant_id": 7,
        "key_id": 42,
        "key_limits": KEY_LIMITS,
        "tenant_limits": TENANT_LIMITS,
    }
    start = time.perf_counter()
    for _ in range(n):
        await limiter.admit(request_id="req-1", **common)  # type: ignore[arg-type]
    timings["admit"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        await limiter.reserve(request_id="req-1", tokens=500, **common)  # type: ignore[arg-type]
    timings["reserve"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        await limiter.settle(
            tenant_id=7,
            key_id=42,
            reserved=500,
            actual=120,
            reserved_at=NOW,
            key_limits=KEY_LIMITS,
            tenant_limits=TENANT_LIMITS,
            release_lease_id="lease",
            reservation_id="resv",
        )
    timings["settle"] = time.perf_counter() - start
    return timings


async def _capture() -> dict[str, Any]:
    from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
    from neuronetz_gateway.devstack.servers import ThrowawayRedis

    server = ThrowawayRedis()
    try:
        client = await open_redis(server.url)
        limiter = Limiter(client, ledger=_Ledger(), clock=lambda: NOW)
        replies: dict[str, Any] = {}
        real = limiter._commands.evalsha

        async def record(sha: str, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
            reply = await real(sha, script, keys, args)
            first = args[0]
            replies[first if first in ("admit", "reserve") else "settle"] = reply
            return reply

        limiter._commands.evalsha = record  # type: ignore[method-assign]
        await _calls(limiter, 3)  # the first decide rebuilds the budget counters
        await limiter.aclose()
        await close_redis(client)
    finally:
        server.destroy()
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", metavar="FILE")
    parser.add_argument("--replies", metavar="FILE")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.capture:
        replies = asyncio.run(_capture())
        with open(args.capture, "w", encoding="utf-8") as out:
            out.write(repr(replies) + "\n")
        return
    with open(args.replies, encoding="utf-8") as source:
        replies = ast.literal_eval(source.read())

    async def run() -> dict[str, float]:
        from redis import asyncio as aioredis

        limiter = Limiter(aioredis.Redis(port=1), ledger=_Ledger(), clock=lambda: NOW)
        limiter._commands = _Canned(replies)
        limiter._bounded = True
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, seconds in (await _calls(limiter, args.calls)).items():
                best[name] = min(best.get(name, float("inf")), seconds)
        return {name: round(s / args.calls * 1e6, 3) for name, s in best.items()}

    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main()
