"""Benchmark: ``GET /authorize`` on a cache hit against a trivial Litestar handler.

Both run under Granian with the same settings (ASGI, one worker, backlog
2048, no access log) in subprocesses on 127.0.0.1; the load comes from
``wrk`` (bounded: fixed connections for a fixed time) or, without it, an
aiohttp client at fixed concurrency. Prints throughput and p50/p99 for both
and the throughput ratio auth/baseline.

Postgres and Redis: ``NZ_DATABASE_URL``/``NZ_REDIS_URL`` when set (the
database must be migrated), else throwaway local servers (as the tests use).

    .venv/bin/python -m tests.bench.bench_authorize --duration 10 --connections 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "neuronetz-gateway")
SECRET = "bench-secret-" + "y" * 40


def create_baseline_app() -> object:
    """The baseline: a trivial Litestar handler at the same path (Granian factory)."""
    from litestar import Litestar, get

    @get("/authorize", sync_to_thread=False)
    def authorize() -> None:
        return None

    return Litestar([authorize], openapi_config=None, logging_config=None)


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


@contextlib.contextmanager
def _served(argv: list[str], env: dict[str, str], port: int, path: str) -> Iterator[str]:
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(base + path, timeout=1)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_port() -> int:
    from tests.support.servers import free_port

    return free_port()


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNIT[unit]


def _wrk(name: str, url: str, headers: dict[str, str], args: argparse.Namespace) -> Result:
    argv = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{args.duration}s",
        "--latency",
    ]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Result(name, rps, p50, p99, int(bad.group(1)) if bad else 0)


async def _aiohttp_load(
    name: str, url: str, headers: dict[str, str], args: argparse.Namespace
) -> Result:
    import aiohttp

    latencies: list[float] = []
    non_2xx = 0
    stop_at = time.monotonic() + args.duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal non_2xx
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            async with session.get(url, headers=headers) as response:
                await response.read()
                if response.status >= 300:
                    non_2xx += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(args.connections)))
        elapsed = time.monotonic() - began
    cuts = statistics.quantiles(latencies, n=100)
    return Result(name, len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000, non_2xx)


def _load(name: str, url: str, headers: dict[str, str], args: argparse.Namespace) -> Result:
    if shutil.which("wrk") and not args.aiohttp:
        return _wrk(name, url, headers, args)
    return asyncio.run(_aiohttp_load(name, url, headers, args))


@contextlib.contextmanager
def _backing_services() -> Iterator[tuple[str, str]]:
    database, redis = os.environ.get("NZ_DATABASE_URL"), os.environ.get("NZ_REDIS_URL")
    if database and redis:
        yield database, redis
        return
    from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
    from tests.support.servers import ThrowawayPostgres, ThrowawayRedis

    pg, rd = ThrowawayPostgres(), ThrowawayRedis()
    try:
        asyncio.run(apply_migrations(pg.admin_url))
        yield pg.admin_url, rd.url
    finally:
        rd.destroy()
        pg.destroy()


async def _create_key(database_url: str) -> str:
    from neuronetz_gateway.adapters.hashing import KeyHasher
    from neuronetz_gateway.adapters.postgres.store import Store, open_pool
    from neuronetz_gateway.domain.keys import generate_key
    from neuronetz_gateway.domain.policy import PolicySettings

    pool = await open_pool(database_url)
    try:
        store = Store(pool)
        tenant = f"bench-{secrets.token_hex(4)}"
        await store.create_tenant(tenant, PolicySettings(rpm=100_000_000))
        key = generate_key()
        await store.create_key(
            tenant_name=tenant,
            name="bench",
            prefix=key.prefix,
            secret_hash=KeyHasher().hash(key.full),
            policy=PolicySettings(rpm=50_000_000),
            expires_at=None,
            log_prompts=False,
            prompt_ttl_days=None,
        )
        return key.full
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--aiohttp", action="store_true", help="use the aiohttp client, not wrk")
    args = parser.parse_args()

    with _backing_services() as (database_url, redis_url):
        key = asyncio.run(_create_key(database_url))
        env = {
            **os.environ,
            "NZ_DATABASE_URL": database_url,
            "NZ_REDIS_URL": redis_url,
            "NZ_REDIS_PREFIX": f"bench{secrets.token_hex(3)}",
            "NZ_GATEWAY_SECRET": SECRET,
            "NZ_LOG_LEVEL": "warning",  # the canonical line per decision is info
            "NZ_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        headers = {
            "authorization": f"Bearer {key}",
            "x-forwarded-method": "POST",
            "x-forwarded-uri": "/api/chat",
        }
        baseline_port, auth_port = _free_port(), _free_port()
        granian = (
            "from granian import Granian; from granian.constants import Interfaces;"
            f"Granian('tests.bench.bench_authorize:create_baseline_app', address='127.0.0.1',"
            f" port={baseline_port}, interface=Interfaces.ASGI, workers=1, factory=True,"
            " log_access=False, backlog=2048).serve()"
        )
        results = []
        with _served([sys.executable, "-c", granian], env, baseline_port, "/authorize") as base:
            _load("baseline", base + "/authorize", headers, args)  # warm-up
            results.append(_load("baseline", base + "/authorize", headers, args))
        auth_argv = [CLI, "serve", "auth", "--host", "127.0.0.1", "--port", str(auth_port)]
        with _served(auth_argv, env, auth_port, "/healthz") as base:
            check = httpx.get(base + "/authorize", headers=headers, timeout=5)
            if check.status_code != 200:
                raise SystemExit(f"/authorize answered {check.status_code}: {check.text}")
            _load("authorize", base + "/authorize", headers, args)  # warm-up
            results.append(_load("authorize", base + "/authorize", headers, args))

    tool = "wrk" if shutil.which("wrk") and not args.aiohttp else "aiohttp"
    print(f"load: {tool}, {args.connections} connections, {args.duration} s per run")
    for r in results:
        print(
            f"{r.name:<10} {r.rps:>9.0f} req/s   p50 {r.p50_ms:6.2f} ms   p99 {r.p99_ms:6.2f} ms"
            f"   non-2xx {r.non_2xx}"
        )
    print(f"ratio authorize/baseline throughput: {results[1].rps / results[0].rps:.2f}")


if __name__ == "__main__":
    main()
