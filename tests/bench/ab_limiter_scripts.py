"""A/B of the limiter's Lua scripts: Redis CPU per request, a git ref against the working tree.

One throwaway Redis; per round, each side (``--base`` ref, then the working
tree) runs in its own Python process (its ``services/`` first on the path)
and plays ``--requests`` requests the way the gateway's streaming path does
against the real :class:`~neuronetz_gateway.adapters.redis_limiter.Limiter`:
``admit`` (auth: RPM, a concurrency lease, TPM and budgets checked), then
``reserve`` (proxy: the identity claimed, tokens reserved), then ``settle``
(proxy: the actual count, the lease released, no stats), ``--concurrency``
requests at a time over the pipelined connection, every limit and budget on
at both levels (far above what a run reaches, as the benchmark key has them).
Redis starts each cell from a ``FLUSHALL``, sets filled as a steady load
leaves them (a minute of RPM hits, 59 live TPM seconds, 100,000 settled
marks) and a warm-up; the cell's Redis CPU (the time on a CPU of its
threads, ``/proc/<pid>/task/*/schedstat``, ns) and ``INFO commandstats``
are read around the measured requests. The order of the sides alternates
per round; the medians, and the working tree's ratio to the base per round
then their median, close the output.

Run from the repository root::

    python -m tests.bench.ab_limiter_scripts --base main --rounds 5 --requests 3000

Not collected by pytest; Redis listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.git_ref import export_services

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The side's process: plays the requests, prints one JSON line.
_PLAY = r"""
import asyncio, json, sys, time
from datetime import datetime
import redis as sync_redis
from neuronetz_gateway.adapters.postgres.store import LedgerTotals
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import Limits

url, warm, requests, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
HIGH = Limits(rpm=10**9, tpm=10**15, concurrency=10**6, daily_tokens=10**15,
              monthly_tokens=10**15, total_tokens=10**15)

class Ledger:
    async def ledger_totals(self, *, tenant_id, key_id, day_start, month_start):
        return LedgerTotals(daily=0, monthly=0, total=0)

def cpu(pid):
    # seconds on a CPU, every thread of the server (schedstat: ns, not 10 ms ticks)
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9

import os
serial = iter(range(10**9))

async def one(limiter):
    rid = f"r{next(serial)}"
    d = await limiter.admit(tenant_id=1, key_id=1, key_limits=HIGH, tenant_limits=HIGH,
                            request_id=rid)
    assert d.allowed, d
    reserved_at = time.time()
    r = await limiter.reserve(tenant_id=1, key_id=1, key_limits=HIGH, tenant_limits=HIGH,
                              request_id=rid, tokens=2000,
                              single_use_until_ms=int(time.time() * 1000) + 30000)
    assert r.allowed, r
    await limiter.settle(tenant_id=1, key_id=1, reserved=2000, actual=57,
                         reserved_at=reserved_at, release_lease_id=d.lease_id,
                         reservation_id=r.reservation_id, audited_at=None)

async def run(limiter, n):
    left = iter(range(n))
    async def worker():
        for _ in left:
            await one(limiter)
    await asyncio.gather(*(worker() for _ in range(concurrency)))

def steady(sync):
    # what a steady 500 req/s leaves in the sets: a minute of hits, 59 live TPM seconds,
    # settled marks of the last reservation TTL (a part of them)
    now_ms = int(time.time() * 1000)
    pipe = sync.pipeline(transaction=False)
    for owner in ("k1", "t"):
        for i in range(0, 30000, 1000):
            hits = {f"old{j}:x": now_ms - 59000 + j * 59000 // 30000 for j in range(i, i + 1000)}
            pipe.zadd(f"nzab:{{t1}}:rpm:{owner}", hits)
        pipe.pexpire(f"nzab:{{t1}}:rpm:{owner}", 61000)
        # the running totals first, where a hash born with them has them (ignored by,
        # and so deleted by, scripts of a release without them)
        now_s = now_ms // 1000
        totals = {"0": 59 * 2000, "1": now_s - 59, "2": now_s - 5}
        buckets = {str(now_s - s): 2000 for s in range(59, 0, -1)}
        pipe.hset(f"nzab:{{t1}}:tpm:{owner}", mapping={**totals, **buckets})
        pipe.expire(f"nzab:{{t1}}:tpm:{owner}", 120)
    for i in range(0, 100000, 1000):
        pipe.zadd("nzab:{t1}:resv", {f"old{j}": now_ms + 600000 + j for j in range(i, i + 1000)})
        pipe.hset("nzab:{t1}:resv:rec", mapping={f"old{j}": "settled" for j in range(i, i + 1000)})
    pipe.execute()

async def main():
    sync = sync_redis.Redis.from_url(url)
    pid = int(sync.info("server")["process_id"])
    sync.flushall()
    steady(sync)
    client = await open_redis(url)
    limiter = Limiter(client, prefix="nzab", ledger=Ledger(), reservation_ttl_seconds=695.0)
    try:
        await run(limiter, warm)
        sync.config_resetstat()
        c0 = cpu(pid)
        t0 = time.perf_counter()
        await run(limiter, requests)
        elapsed = time.perf_counter() - t0
        c1 = cpu(pid)
        stats = sync.info("commandstats")
    finally:
        await limiter.aclose()
        await close_redis(client)
    print(json.dumps({
        "redis_us": (c1 - c0) * 1e6 / requests,
        "script_us": sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_evalsha"))
                     / requests,
        "calls": {k.removeprefix("cmdstat_"): v["calls"] / requests for k, v in stats.items()
                  if not k.startswith("cmdstat_config")},
        "rps": requests / elapsed,
    }))

asyncio.run(main())
"""


def _play(services: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{services}{os.pathsep}{REPO_ROOT}"}
    argv = [sys.executable, "-c", _PLAY, url, str(args.warm), str(args.requests)]
    out = subprocess.run(
        [*argv, str(args.concurrency)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    """Start a Redis, alternate the sides for ``--rounds`` rounds, print the medians."""
    from neuronetz_gateway.devstack.servers import ThrowawayRedis

    parser = argparse.ArgumentParser(prog="python -m tests.bench.ab_limiter_scripts")
    parser.add_argument("--base", default="main", help="git ref of side A (main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warm", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    server = ThrowawayRedis()
    cells: dict[str, list[dict[str, Any]]] = {"base": [], "wt": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # both sides copied alike (no bytecode cache on either: a like start)
            wt = Path(tmp) / "wt" / "services"
            shutil.copytree(
                REPO_ROOT / "services", wt, ignore=shutil.ignore_patterns("__pycache__")
            )
            sides = {"base": export_services(args.base, Path(tmp) / "base"), "wt": wt}
            for rnd in range(args.rounds):
                order = ["base", "wt"] if rnd % 2 == 0 else ["wt", "base"]
                for side in order:
                    cell = _play(sides[side], server.url, args)
                    cells[side].append(cell)
                    print(
                        f"round {rnd} {side:4}: redis {cell['redis_us']:6.1f} us/req, "
                        f"in scripts {cell['script_us']:6.1f} us/req, {cell['rps']:.0f} req/s",
                        flush=True,
                    )
    finally:
        server.stop()
    for side, runs in cells.items():
        med = statistics.median(c["redis_us"] for c in runs)
        script = statistics.median(c["script_us"] for c in runs)
        calls = ", ".join(f"{k} {v:.2f}" for k, v in sorted(runs[-1]["calls"].items()))
        print(f"{side:4}: median redis {med:.1f} us/req, in scripts {script:.1f}; per req: {calls}")
    ratios = [
        w["redis_us"] / b["redis_us"] for b, w in zip(cells["base"], cells["wt"], strict=True)
    ]
    script_ratios = [
        w["script_us"] / b["script_us"] for b, w in zip(cells["base"], cells["wt"], strict=True)
    ]
    print(
        f"wt / base: redis CPU {statistics.median(ratios):.3f}, "
        f"in scripts {statistics.median(script_ratios):.3f} (median of per-round ratios)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
