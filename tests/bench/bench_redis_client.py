"""Which Redis client should the limiter use? The decision path, measured.

Run: ``.venv/bin/python tests/bench/bench_redis_client.py [--requests 20000] [--concurrency 32]``

Each client runs the limiter's real ``decide.lua`` (``admit`` with RPM,
concurrency, TPM and all three budgets on at both levels, as the benchmark
key has them) ``--requests`` times with ``--concurrency`` callers, against
a throwaway Redis (or ``NZ_TEST_REDIS_URL``), and reports decisions/s, the
client's CPU per decision (this process) and Redis's CPU per decision (its
``/proc`` counters, when it runs on this machine). Every reply is checked
(``ok``). Candidates, in alternating rounds:

- ``redis-py``: ``redis.asyncio`` over a ``BlockingConnectionPool`` (what
  the auth service shares with its key cache), ``EVALSHA`` via a registered
  ``Script``;
- ``redis-py execute_command``: the same pool, ``EVALSHA`` sent directly;
- ``pipelined``: :class:`~neuronetz_gateway.adapters.redis_pipeline.PipelinedRedis`,
  one connection, every caller's commands pipelined.

Not collected by pytest. Load targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import resource
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis.asyncio as aioredis

from neuronetz_gateway.adapters.redis_limiter import limiter_script
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis
from tests.support.servers import ThrowawayRedis

SCRIPT = limiter_script("decide.lua")
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
HIGH = [1_000_000_000, 10**15, 1_000_000, 10**15, 10**15, 10**15]
Call = Callable[[list[str], list[Any]], Awaitable[Any]]


@contextlib.contextmanager
def _redis() -> Iterator[tuple[str, int | None]]:
    url = os.environ.get("NZ_TEST_REDIS_URL")
    if url:
        yield url, None
        return
    server = ThrowawayRedis()
    try:
        client = __import__("redis").Redis.from_url(server.url)
        pid = int(client.info("server")["process_id"])
        client.close()
        yield server.url, pid
    finally:
        server.destroy()


def _server_cpu(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _decision(prefix: str, i: int) -> tuple[list[str], list[Any]]:
    base = f"{prefix}:{{t1}}"
    keys = []
    for owner in ("k1", "t"):
        keys += [f"{base}:rpm:{owner}", f"{base}:conc:{owner}", f"{base}:tpm:{owner}"]
        keys += [f"{base}:bud:{owner}:d:20261126", f"{base}:bud:{owner}:m:202611"]
        keys += [f"{base}:bud:{owner}:total"]
    now_ms = int(time.time() * 1000)
    args = ["admit", now_ms, now_ms // 1000, f"r{i}:{secrets.token_hex(6)}", secrets.token_hex(16)]
    args += [now_ms + 60_000, 61_000, 0, *HIGH, *HIGH]
    return keys, args


async def _run(
    name: str, call: Call, prefix: str, pid: int | None, args: Any, client: aioredis.Redis
) -> dict[str, Any]:
    keys, _ = _decision(prefix, 0)
    for budget in (*keys[3:6], *keys[9:12]):  # as if rebuilt from the ledger
        await client.set(budget, 0)

    async def one(i: int) -> None:
        keys, argv = _decision(prefix, i)
        reply = await call(keys, argv)
        if reply[0] != b"ok":
            raise RuntimeError(f"{name}: unexpected reply {reply!r}")

    for i in range(200):  # warm: connections open, script loaded
        await one(i)
    remaining = args.requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(remaining)

    usage, server = resource.getrusage(resource.RUSAGE_SELF), _server_cpu(pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return {
        "client": name,
        "per_s": args.requests / elapsed,
        "client_us": client_cpu / args.requests * 1e6,
        "server_us": (_server_cpu(pid) - server) / args.requests * 1e6,
    }


async def _round(url: str, pid: int | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=1.0)
    client = aioredis.Redis(connection_pool=pool)
    script = client.register_script(SCRIPT)
    pipelined = PipelinedRedis.for_client(client, 1.0)
    assert pipelined is not None
    prefix = f"bench{secrets.token_hex(3)}"

    async def via_script(keys: list[str], argv: list[Any]) -> Any:
        return await script(keys=keys, args=argv)

    async def via_execute(keys: list[str], argv: list[Any]) -> Any:
        return await client.execute_command("EVALSHA", SHA, len(keys), *keys, *argv)

    async def via_pipeline(keys: list[str], argv: list[Any]) -> Any:
        return await pipelined.evalsha(SHA, SCRIPT, keys, argv)

    try:
        return [
            await _run("redis-py Script", via_script, prefix + "a", pid, args, client),
            await _run("redis-py execute_command", via_execute, prefix + "b", pid, args, client),
            await _run("pipelined", via_pipeline, prefix + "c", pid, args, client),
        ]
    finally:
        await pipelined.aclose()
        await client.aclose(close_connection_pool=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with _redis() as (url, pid):
        for _ in range(args.rounds):
            for row in asyncio.run(_round(url, pid, args)):
                results.setdefault(row["client"], []).append(row)
    print(
        f"decide.lua admit, {args.requests} decisions x {args.rounds} rounds,"
        f" concurrency {args.concurrency} (medians):"
    )
    print(f"{'client':26} {'decisions/s':>12} {'client us':>10} {'redis us':>9}")
    for name, rows in results.items():
        med = {
            k: statistics.median(r[k] for r in rows) for k in ("per_s", "client_us", "server_us")
        }
        print(f"{name:26} {med['per_s']:>12.0f} {med['client_us']:>10.1f} {med['server_us']:>9.1f}")


if __name__ == "__main__":
    main()
