"""Which HTTP client should the proxy use upstream? Streams from the simulator, measured.

Run: ``.venv/bin/python tests/bench/bench_upstream_clients.py [--concurrency 32] [--requests 2000]``

Each client streams 20-chunk ``/api/chat`` answers from the bundled simulator
(a Granian subprocess, recording off) with one pooled session and
``--concurrency`` requests in flight, checking every stream's bytes end with
the final chunk (correctness), and reports streams/s and p50/p99 latency.

Candidates: aiohttp; httpx 0.28 ``AsyncClient`` (pooled, httpcore); httpx
over an aiohttp transport (``httpx-aiohttp``, if importable; it is not a
project dependency: ``pip install --target DIR httpx-aiohttp`` and pass
``--extra-path DIR``); httpx2 (if installed). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from tests.support.proxy_stack import running_simulator

BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi there"}]}'
HEADERS = {"content-type": "application/json"}
Stream = Callable[[], Awaitable[bytes]]


async def _measure(name: str, stream: Stream, concurrency: int, total: int) -> dict[str, Any]:
    for _ in range(min(concurrency, 20)):  # warm the pool
        await stream()
    latencies: list[float] = []
    remaining = total
    bad = 0

    async def worker() -> None:
        nonlocal remaining, bad
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            data = await stream()
            latencies.append(time.perf_counter() - start)
            if b'"done":true' not in data.rsplit(b"\n", 2)[-2]:
                bad += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "client": name,
        "streams_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "incorrect": bad,
    }


async def _aiohttp(url: str, concurrency: int, total: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as session:

        async def stream() -> bytes:
            async with session.post(url, data=BODY, headers=HEADERS) as reply:
                parts = [chunk async for chunk in reply.content.iter_any()]
                return b"".join(parts)

        return await _measure("aiohttp 3.x ClientSession", stream, concurrency, total)


async def _httpx_like(
    name: str, client: Any, url: str, concurrency: int, total: int
) -> dict[str, Any]:
    async with client:

        async def stream() -> bytes:
            async with client.stream("POST", url, content=BODY, headers=HEADERS) as reply:
                parts = [chunk async for chunk in reply.aiter_raw()]
                return b"".join(parts)

        return await _measure(name, stream, concurrency, total)


async def run(concurrency: int, total: int) -> list[dict[str, Any]]:
    results = []
    with running_simulator(NZ_SIM_RECORD="0") as sim:
        url = f"{sim.url}/api/chat"
        results.append(await _aiohttp(url, concurrency, total))
        import httpx

        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        results.append(
            await _httpx_like(
                f"httpx {httpx.__version__} AsyncClient",
                httpx.AsyncClient(limits=limits, timeout=60),
                url,
                concurrency,
                total,
            )
        )
        try:
            from httpx_aiohttp import HttpxAiohttpClient
        except ImportError:
            print("httpx-aiohttp not importable: skipped", file=sys.stderr)
        else:
            results.append(
                await _httpx_like(
                    "httpx + httpx-aiohttp transport",
                    HttpxAiohttpClient(limits=limits, timeout=60),
                    url,
                    concurrency,
                    total,
                )
            )
        try:
            import httpx2
        except ImportError:
            print("httpx2 not installed: skipped", file=sys.stderr)
        else:
            limits2 = httpx2.Limits(max_connections=1024, max_keepalive_connections=1024)
            results.append(
                await _httpx_like(
                    f"httpx2 {httpx2.__version__} AsyncClient",
                    httpx2.AsyncClient(limits=limits2, timeout=60),
                    url,
                    concurrency,
                    total,
                )
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--extra-path", action="append", default=[])
    args = parser.parse_args()
    sys.path[:0] = args.extra_path
    results = asyncio.run(run(args.concurrency, args.requests))
    print(f"20-chunk streams from the simulator, concurrency {args.concurrency}:")
    print(f"{'client':40} {'streams/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'bad':>4}")
    for r in results:
        print(
            f"{r['client']:40} {r['streams_per_s']:>10} {r['p50_ms']:>8} {r['p99_ms']:>8}"
            f" {r['incorrect']:>4}"
        )


if __name__ == "__main__":
    main()
