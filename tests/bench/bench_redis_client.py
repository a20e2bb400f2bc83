"""Which Redis client should the limiter use? The decision path, measured (``task bench:redis``).

Run: ``.venv/bin/python -m tests.bench.bench_redis_client [--requests 10000] [--concurrency 32]``

Each client runs the limiter's real ``decide.lua`` (``admit`` with RPM,
concurrency, TPM and all three budgets on at both levels, as the benchmark
key has them) ``--requests`` times with ``--concurrency`` callers, on each
Redis deployment (``tests/support/redis_deployments.py``): one server, one
server over TLS, a Cluster (3 masters + 3 replicas), a Cluster over TLS.
It reports decisions/s, the client's CPU per decision (this process, its
threads included) and Redis's CPU per decision (every node's ``/proc``
counters). Every reply is checked (``ok``). Candidates, in alternating rounds:

- ``pipelined (ours)``: :class:`~neuronetz_gateway.adapters.redis_pipeline.PipelinedRedis`,
  one connection, every caller's commands pipelined (single server only:
  it follows no slot map);
- ``redis-py + hiredis``: the client ``open_redis`` gives (redis.asyncio over
  a ``BlockingConnectionPool``; ``RedisCluster`` on a Cluster), ``EVALSHA``;
- ``coredis``: ``coredis.Redis`` / ``coredis.RedisCluster``, ``EVALSHA``;
- ``valkey-glide``: ``GlideClient`` / ``GlideClusterClient`` (a Rust core),
  ``invoke_script``.

coredis and valkey-glide are not project dependencies: they are installed
into a throwaway venv, ``.bench/redis-clients-venv`` (``python3 -m venv`` +
``pip install coredis valkey-glide``, once), whose site-packages are put at
the *end* of ``sys.path`` here (the project's own packages win). Without it
(``--no-extras``, or the install fails) only our two clients run.

Writes ``docs/benchmarks-redis-clients.{md,json}``; ``task bench`` puts the
table into ``docs/benchmarks.md``. Not collected by pytest. Load targets
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import resource
import secrets
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_limiter import limiter_script
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis
from tests.bench.litellm_peer import _base_python
from tests.support.redis_deployments import RedisDeployment, start_deployment

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = limiter_script("decide.lua")
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
HIGH = [1_000_000_000, 10**15, 1_000_000, 10**15, 10**15, 10**15]
EXTRAS_VENV = ROOT / ".bench" / "redis-clients-venv"
DEPLOYMENTS = ("single", "tls", "cluster", "cluster+tls")
OUT = ROOT / "docs" / "benchmarks-redis-clients"
Call = Callable[[list[str], list[str]], Awaitable[Any]]


@dataclass
class Client:
    """One candidate opened on one deployment: how to call the script, set a key, close."""

    name: str
    call: Call
    set: Callable[[str, str], Awaitable[Any]]
    close: Callable[[], Awaitable[Any]]


# ---------------------------------------------------------------------- extras


def ensure_extras(install: bool) -> str | None:
    """Put coredis and valkey-glide on ``sys.path`` (installing them once); None when usable."""
    python = EXTRAS_VENV / "bin" / "python"
    if install and not python.is_file():
        print(f"installing coredis and valkey-glide into {EXTRAS_VENV} (throwaway)", flush=True)
        subprocess.run([_base_python(), "-m", "venv", str(EXTRAS_VENV)], check=True)
        result = subprocess.run(
            [str(EXTRAS_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
             "coredis", "valkey-glide"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            return "pip install coredis valkey-glide failed: " + result.stderr.strip()[-300:]
    if not python.is_file():
        return f"no {EXTRAS_VENV}"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    sys.path.append(site)
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("redis", "hiredis", "coredis", "valkey-glide"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------- clients


def _host_port(deployment: RedisDeployment) -> tuple[str, int]:
    return "127.0.0.1", deployment.nodes[0].port


def _cluster(deployment: RedisDeployment) -> bool:
    return deployment.kind.startswith("cluster")


def _tls(deployment: RedisDeployment) -> bool:
    return deployment.url.startswith("rediss")


async def _redis_py(deployment: RedisDeployment) -> tuple[Client, RedisClient]:
    client = await open_redis(
        deployment.url, timeout_seconds=5.0, ca_file=deployment.ca_file, max_connections=64
    )

    await client.script_load(SCRIPT)  # on every primary of a Cluster

    async def call(keys: list[str], argv: list[str]) -> Any:
        return await client.evalsha(SHA, len(keys), *keys, *argv)

    async def close() -> None:
        await close_redis(client)

    return Client("redis-py + hiredis", call, client.set, close), client


async def _pipelined(client: RedisClient) -> Client | None:
    pipelined = PipelinedRedis.for_client(client, 5.0)
    if pipelined is None:
        return None

    async def call(keys: list[str], argv: list[str]) -> Any:
        return await pipelined.evalsha(SHA, SCRIPT, keys, argv)

    async def set_key(key: str, value: str) -> Any:
        return await pipelined.execute("SET", key, value)

    return Client("pipelined (ours)", call, set_key, pipelined.aclose)


async def _coredis(deployment: RedisDeployment) -> Client:
    coredis: Any = importlib.import_module("coredis")  # from the throwaway venv

    host, port = _host_port(deployment)
    tls: dict[str, Any] = {}
    if _tls(deployment):
        context = ssl.create_default_context(cafile=deployment.ca_file)
        tls = {"ssl": True, "ssl_context": context}
    if _cluster(deployment):
        client: Any = coredis.RedisCluster(host, port, max_connections=64, **tls)
    else:
        client = coredis.Redis(host, port, max_connections=64, **tls)
    if hasattr(client, "__aenter__"):  # coredis 6 clients are opened as a context
        await client.__aenter__()

    await client.script_load(SCRIPT)

    async def call(keys: list[str], argv: list[str]) -> Any:
        return await client.evalsha(SHA, keys=keys, args=argv)

    async def close() -> None:
        if hasattr(client, "__aexit__"):
            await client.__aexit__(None, None, None)

    return Client("coredis", call, client.set, close)


async def _glide(deployment: RedisDeployment, ca_pem: bytes | None) -> Client:
    glide: Any = importlib.import_module("glide")  # from the throwaway venv

    host, port = _host_port(deployment)
    advanced: dict[str, Any] = {}
    if _tls(deployment) and ca_pem:
        tls_config = glide.TlsAdvancedConfiguration(root_pem_cacerts=ca_pem)
        advanced_cls = (
            glide.AdvancedGlideClusterClientConfiguration
            if _cluster(deployment)
            else glide.AdvancedGlideClientConfiguration
        )
        advanced = {"advanced_config": advanced_cls(tls_config=tls_config)}
    addresses = [glide.NodeAddress(host, port)]
    client: Any
    if _cluster(deployment):
        config: Any = glide.GlideClusterClientConfiguration(
            addresses, use_tls=_tls(deployment), request_timeout=5000, **advanced
        )
        client = await glide.GlideClusterClient.create(config)
    else:
        config = glide.GlideClientConfiguration(
            addresses, use_tls=_tls(deployment), request_timeout=5000, **advanced
        )
        client = await glide.GlideClient.create(config)
    script = glide.Script(SCRIPT)

    async def call(keys: list[str], argv: list[str]) -> Any:
        return await client.invoke_script(script, keys=keys, args=argv)

    return Client("valkey-glide", call, client.set, client.close)


async def _open_all(
    deployment: RedisDeployment, extras: bool, ca_pem: bytes | None
) -> list[Client]:
    ours, raw = await _redis_py(deployment)
    clients = [ours]
    pipelined = await _pipelined(raw)
    if pipelined is not None:
        clients.insert(0, pipelined)
    if extras:
        clients.append(await _coredis(deployment))
        clients.append(await _glide(deployment, ca_pem))
    return clients


# ---------------------------------------------------------------------- the run


def _redis_cpu(deployment: RedisDeployment) -> float:
    total = 0
    for node in deployment.nodes:
        if node.proc is None:
            continue
        fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _decision(prefix: str, i: int) -> tuple[list[str], list[str]]:
    base = f"{prefix}:{{t1}}"
    keys = []
    for owner in ("k1", "t"):
        keys += [f"{base}:rpm:{owner}", f"{base}:conc:{owner}", f"{base}:tpm:{owner}"]
        keys += [f"{base}:bud:{owner}:d:20261126", f"{base}:bud:{owner}:m:202611"]
        keys += [f"{base}:bud:{owner}:total"]
    keys += [f"{base}:resv", f"{base}:resv:rec"]  # the reservation records (swept first)
    now_ms = int(time.time() * 1000)
    args: list[Any] = ["admit", now_ms, now_ms // 1000, f"r{i}:{secrets.token_hex(6)}"]
    args += [secrets.token_hex(16), now_ms + 60_000, 61_000, 0, *HIGH, *HIGH, "", 0]
    return keys, [str(a) for a in args]


def _ok(reply: Any) -> bool:
    first = reply[0] if isinstance(reply, list | tuple) and reply else None
    return first in (b"ok", "ok")


async def _measure(
    client: Client, deployment: RedisDeployment, requests: int, concurrency: int
) -> dict[str, Any]:
    prefix = f"bench{secrets.token_hex(3)}"
    keys, _ = _decision(prefix, 0)
    for budget in (*keys[3:6], *keys[9:12]):  # as if rebuilt from the ledger
        await client.set(budget, "0")

    async def one(i: int) -> None:
        keys, argv = _decision(prefix, i)
        reply = await client.call(keys, argv)
        if not _ok(reply):
            raise RuntimeError(f"{client.name}: unexpected reply {reply!r}")

    for i in range(4):  # warm: every connection open (TLS handshakes done), script loaded
        await asyncio.gather(*(one(i * concurrency + j) for j in range(concurrency)))
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(remaining)

    usage, server = resource.getrusage(resource.RUSAGE_SELF), _redis_cpu(deployment)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return {
        "client": client.name,
        "deployment": deployment.kind,
        "per_s": requests / elapsed,
        "client_us": client_cpu / requests * 1e6,
        "server_us": (_redis_cpu(deployment) - server) / requests * 1e6,
    }


async def _round(
    deployment: RedisDeployment, args: argparse.Namespace, extras: bool, shift: int
) -> list[dict[str, Any]]:
    ca_pem = Path(deployment.ca_file).read_bytes() if deployment.ca_file else None  # noqa: ASYNC240
    clients = await _open_all(deployment, extras, ca_pem)
    shift %= len(clients)
    try:
        return [
            await _measure(c, deployment, args.requests, args.concurrency)
            for c in [*clients[shift:], *clients[:shift]]
        ]
    finally:
        for client in clients:
            await client.close()


def _table(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["deployment"], row["client"]), []).append(row)
    best: dict[str, float] = {}
    medians = {}
    for (kind, name), group in groups.items():
        med = {
            k: statistics.median(r[k] for r in group) for k in ("per_s", "client_us", "server_us")
        }
        medians[(kind, name)] = med
        if name != "pipelined (ours)" or kind in ("single", "tls"):
            best[kind] = max(best.get(kind, 0.0), med["per_s"])
    out = [
        "| deployment | client | decisions/s | ÷ fastest here | client CPU µs/decision "
        "| Redis CPU µs/decision |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (kind, name), med in medians.items():
        out.append(
            f"| {kind} | {name} | {med['per_s']:,.0f} | {med['per_s'] / best[kind]:.2f} | "
            f"{med['client_us']:.1f} | {med['server_us']:.1f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    parser.add_argument("--no-extras", action="store_true", help="only our two clients")
    parser.add_argument("--out", type=Path, default=OUT, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    problem = "skipped (--no-extras)" if args.no_extras else ensure_extras(install=True)
    if problem:
        print(f"coredis / valkey-glide not measured: {problem}", flush=True)
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for kind in args.deployments.split(","):
        print(f"{kind}: starting", flush=True)
        deployment = start_deployment(kind)
        try:
            for round_no in range(args.rounds):
                for row in asyncio.run(_round(deployment, args, problem is None, round_no)):
                    print(
                        f"  {kind:12} {row['client']:20} {row['per_s']:>8.0f}/s "
                        f"client {row['client_us']:6.1f} us  redis {row['server_us']:6.1f} us",
                        flush=True,
                    )
                    rows.append({**row, "round": round_no})
        finally:
            deployment.destroy()
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "versions": _versions(),
        "extras": problem or "measured",
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
    }
    table = _table(rows)
    print("\n".join(table))
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    md = [
        "# Redis clients on the decision path",
        "",
        f"`task bench:redis` (`tests/bench/bench_redis_client.py`) on {meta['date']}: "
        f"`decide.lua` admit (every limit and budget on, both levels), {args.requests} "
        f"decisions x {args.rounds} rounds per client, {args.concurrency} concurrent callers, "
        f"clients alternating; medians. Load average {load[0]:.2f} at the start, "
        f"{meta['loadavg_end'][0]:.2f} at the end (2 shared cores). {versions}. coredis and "
        "valkey-glide come from a throwaway venv (`.bench/redis-clients-venv`), not the "
        "project's dependencies. `pipelined (ours)` follows no slot map, so it has no Cluster "
        "rows; on a Cluster the gateway uses redis-py's `RedisCluster`. Client CPU is this "
        "process's (the Rust threads of valkey-glide included); Redis CPU is all nodes'.",
        "",
        *table,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {args.out.with_suffix('.md')} (+ .json)")


if __name__ == "__main__":
    main()
