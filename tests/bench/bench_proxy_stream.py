"""Streaming throughput through the proxy against the simulator direct.

Run: ``.venv/bin/python tests/bench/bench_proxy_stream.py [--requests 3000]``

Starts the simulator (recording off) and the proxy (``neuronetz-gateway serve
proxy``, one Granian worker) with throwaway Postgres and Redis from the test
harness (or ``NZ_TEST_DATABASE_URL`` / ``NZ_TEST_REDIS_URL``), then streams
20-chunk ``/api/chat`` answers with aiohttp at concurrency 1 and 32:

- ``direct``: the simulator itself (the floor);
- ``proxy``: a signed identity without token limits (no reservation);
- ``proxy+limits``: with TPM and a daily budget on key and tenant, and a
  concurrency lease: reserve, settle and lease release per request.

Not collected by pytest. Load targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import asyncpg

from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
from neuronetz_gateway.domain.identity import Limits
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_stack import running_proxy, running_simulator
from tests.support.servers import postgres_admin_url, redis_url

BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi there"}]}'
LIMITS = Limits(tpm=10**12, daily_tokens=10**12, concurrency=10**6)


async def _load(
    url: str, concurrency: int, total: int, identity: dict[str, Any] | None
) -> dict[str, float]:
    latencies: list[float] = []
    remaining = total
    bad = 0
    counter = 0

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as session:

        async def one() -> None:
            nonlocal bad, counter
            headers = {"content-type": "application/json"}
            if identity is not None:
                counter += 1
                headers[IDENTITY_HEADER] = signed("chat", **identity)
            start = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as reply:
                data = b"".join([c async for c in reply.content.iter_any()])
            latencies.append(time.perf_counter() - start)
            if reply.status != 200 or b'"done":true' not in data:
                bad += 1

        for _ in range(min(concurrency, 20)):
            await one()
        latencies.clear()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "bad": bad,
    }


async def _database(admin: str) -> str:
    name = f"nz_bench_{int(time.time())}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = admin.rsplit("/", 1)[0] + "/" + name
    await apply_migrations(url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    rows = []
    with postgres_admin_url() as admin, redis_url() as redis:
        database = asyncio.run(_database(admin))
        with (
            running_simulator(NZ_SIM_RECORD="0") as sim,
            running_proxy(
                database_url=database,
                redis_url=redis,
                redis_prefix=f"nzbench{int(time.time())}",
                ollama_url=sim.url,
                NZ_DISCOVERY_TTL_SECONDS="10",
            ) as proxy,
        ):
            scenarios = [
                ("direct", f"{sim.url}/api/chat", None),
                ("proxy", f"{proxy.url}/api/chat", {"tenant_id": 1, "key_id": 1}),
                (
                    "proxy+limits",
                    f"{proxy.url}/api/chat",
                    {"tenant_id": 2, "key_id": 2, "key_limits": LIMITS, "tenant_limits": LIMITS},
                ),
            ]
            for concurrency in (1, 32):
                total = args.requests if concurrency > 1 else args.requests // 5
                for name, url, identity in scenarios:
                    result = asyncio.run(_load(url, concurrency, total, identity))
                    rows.append((name, concurrency, result))
    print("20-chunk /api/chat streams (aiohttp client, 1 Granian worker each):")
    print(f"{'target':14} {'conc':>4} {'streams/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'bad':>4}")
    direct = {c: r["rps"] for n, c, r in rows if n == "direct"}
    for name, concurrency, r in rows:
        ratio = r["rps"] / direct[concurrency]
        print(
            f"{name:14} {concurrency:>4} {r['rps']:>10.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}"
            f" {r['bad']:>4}   {ratio:.2f}x direct"
        )


if __name__ == "__main__":
    main()
