"""Benchmark: what tracing costs, off and on, in auth and in the proxy.

Three variants of the same code path, each in its own worker process, in
rotating order over several rounds (the machine is shared: order effects
and drift hit every variant alike):

- ``baseline``: the code of ``--baseline-ref`` (default: main just before
  tracing landed), exported with ``git archive`` and put first on
  ``PYTHONPATH``; same virtualenv, same Postgres, Redis and simulator;
- ``off``: this tree, ``OTEL_*`` unset (what everyone runs by default);
- ``on``: this tree, spans exported by the SDK's batch processor over
  OTLP/HTTP to a local receiver (in this process, decoding every export).

Each worker runs the app in-process and calls it as ASGI (no sockets in
front): auth answers ``GET /authorize`` for a cached key (one Redis round
trip each), the proxy a non-streaming ``POST /api/chat`` with a fresh
signed identity to the bundled simulator. It reports requests/s and the
worker's CPU per request (``time.process_time``, which counts the exporter
thread too). The figures are medians over rounds; the spread of the
baseline's rounds is the noise to read them against.

    .venv/bin/python -m tests.bench.bench_tracing --requests 3000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SECRET = "bench-secret-" + "z" * 40
#: main right before "OpenTelemetry traces" landed (296936a's main-side parent)
DEFAULT_BASELINE = "b53cd76"
VARIANTS = ("baseline", "off", "on")
SERVICES = ("auth", "proxy")
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


# -- the worker (one variant of one service, in its own process) --------------------------


class _Sink:
    """An ASGI ``send`` that keeps the status."""

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def _receive(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # the client stays: nothing more to read
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _drive(call: Any, requests: int, concurrency: int) -> dict[str, float]:
    statuses: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            statuses.append(await call())

    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    await asyncio.gather(*(worker(min(50, n)) for n in share))  # warm-up
    statuses.clear()
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in share))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    bad = sum(1 for s in statuses if s != 200)
    if bad:
        raise RuntimeError(f"{bad} of {len(statuses)} answers were not 200")
    return {"rps": requests / wall, "cpu_us": cpu / requests * 1e6}


def _tracing(variant: str, service: str) -> Any:
    if variant != "on":
        return None
    from neuronetz_gateway.tracing import tracing_from_env

    return tracing_from_env(service)


async def _auth_worker(args: argparse.Namespace) -> dict[str, float]:
    from neuronetz_gateway.adapters.postgres.store import Store, open_pool
    from neuronetz_gateway.auth.app import create_app
    from neuronetz_gateway.settings import Secret, load_settings

    settings = load_settings(
        {},
        database_url=args.database_url,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        gateway_secret=Secret(SECRET),
    )
    pool = await open_pool(args.database_url, min_size=1, max_size=4)
    tracing = _tracing(args.variant, "auth")
    options: dict[str, Any] = {} if tracing is None else {"tracing": tracing}
    app = create_app(settings, store=Store(pool), listen=False, **options)
    headers = [
        (b"x-forwarded-method", b"POST"),
        (b"x-forwarded-uri", b"/api/chat"),
        (b"authorization", f"Bearer {args.key}".encode()),
    ]

    async def call() -> int:
        sink = _Sink()
        await app(_scope("GET", "/authorize", headers), _receive(b""), sink)
        return sink.status

    try:
        async with app.lifespan():
            return await _drive(call, args.requests, args.concurrency)
    finally:
        await pool.close()
        if tracing is not None:
            tracing.shutdown()


async def _proxy_worker(args: argparse.Namespace) -> dict[str, float]:
    from neuronetz_gateway.domain.identity import Identity, sign_identity
    from neuronetz_gateway.proxy.app import create_app
    from neuronetz_gateway.settings import Secret, load_settings

    spool = tempfile.mkdtemp(prefix="nz-bench-spool-")
    settings = load_settings(
        {},
        database_url=args.database_url,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        gateway_secret=Secret(SECRET),
        ollama_url=args.ollama_url,
        audit_spool_dir=spool,
    )
    tracing = _tracing(args.variant, "proxy")
    options: dict[str, Any] = {} if tracing is None else {"tracing": tracing}
    app = create_app(settings, **options)
    body = json.dumps(CHAT).encode()
    unique = secrets.token_hex(4)
    counter = iter(range(10**9))

    async def call() -> int:
        identity = Identity(
            request_id=f"bench-{unique}-{next(counter)}",
            tenant_id=1,
            tenant_name="bench",
            key_id=1,
            key_prefix="nz_bench000",
            route="chat",
            expires_at_ms=int(time.time() * 1000) + 5_000,
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-nz-identity", sign_identity(identity, SECRET.encode()).encode()),
        ]
        sink = _Sink()
        await app(_scope("POST", "/api/chat", headers), _receive(body), sink)
        return sink.status

    try:
        async with app.lifespan():
            return await _drive(call, args.requests, args.concurrency)
    finally:
        if tracing is not None:
            tracing.shutdown()


def _worker_main(args: argparse.Namespace) -> None:
    import uvloop

    run = _auth_worker if args.worker == "auth" else _proxy_worker
    result = uvloop.run(run(args))
    print(json.dumps(result))


# -- the driver ----------------------------------------------------------------------------


@contextmanager
def _baseline_tree(ref: str) -> Iterator[Path]:
    archive = subprocess.run(
        ["git", "archive", ref, "services/neuronetz_gateway"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="nz-bench-baseline-") as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / "services"


@contextmanager
def _stack() -> Iterator[dict[str, str]]:
    """Postgres (a fresh migrated database), Redis, the simulator, a key."""
    import asyncpg

    from neuronetz_gateway.adapters.hashing import KeyHasher
    from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
    from neuronetz_gateway.adapters.postgres.store import Store, open_pool
    from neuronetz_gateway.domain.keys import generate_key
    from neuronetz_gateway.domain.policy import PolicySettings
    from tests.support.proxy_stack import running_simulator
    from tests.support.servers import postgres_admin_url, redis_url

    with ExitStack() as stack:
        admin = stack.enter_context(postgres_admin_url())
        redis = stack.enter_context(redis_url())
        simulator = stack.enter_context(running_simulator(NZ_SIM_CHUNKS="5"))
        name = f"nz_bench_tracing_{secrets.token_hex(4)}"
        database = admin.rsplit("/", 1)[0] + "/" + name

        async def prepare() -> str:
            conn = await asyncpg.connect(admin)
            await conn.execute(f'CREATE DATABASE "{name}"')
            await conn.close()
            await apply_migrations(database)
            pool = await open_pool(database, min_size=1, max_size=2)
            store = Store(pool)
            await store.create_tenant("bench", PolicySettings())
            key = generate_key()
            await store.create_key(
                tenant_name="bench",
                name="bench",
                prefix=key.prefix,
                secret_hash=KeyHasher(1).hash(key.full),
                policy=PolicySettings(),
                expires_at=None,
                log_prompts=False,
                prompt_ttl_days=None,
            )
            await pool.close()
            return key.full

        async def drop() -> None:
            conn = await asyncpg.connect(admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()

        key = asyncio.run(prepare())
        try:
            yield {
                "database_url": database,
                "redis_url": redis,
                "ollama_url": simulator.url,
                "key": key,
            }
        finally:
            asyncio.run(drop())


def _run_worker(
    service: str,
    variant: str,
    stack: dict[str, str],
    baseline: Path,
    otlp_url: str,
    args: argparse.Namespace,
) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NZ_"))}
    if variant == "baseline":
        env["PYTHONPATH"] = str(baseline)
    if variant == "on":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_url
    argv = [
        sys.executable,
        "-m",
        "tests.bench.bench_tracing",
        "--worker",
        service,
        "--variant",
        variant,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--redis-prefix",
        f"nzb{secrets.token_hex(3)}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in stack.items()),
    ]
    out = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{service}/{variant} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _summary(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for service, by_variant in runs.items():
        med = {
            v: {m: statistics.median(r[m] for r in rs) for m in ("rps", "cpu_us")}
            for v, rs in by_variant.items()
        }
        base_rps = [r["rps"] for r in by_variant["baseline"]]
        summary[service] = {
            "median": med,
            "off_vs_baseline_rps": med["off"]["rps"] / med["baseline"]["rps"],
            "off_vs_baseline_cpu": med["off"]["cpu_us"] / med["baseline"]["cpu_us"],
            "on_vs_off_rps": med["on"]["rps"] / med["off"]["rps"],
            "on_vs_off_cpu": med["on"]["cpu_us"] / med["off"]["cpu_us"],
            "baseline_rps_spread": (
                min(base_rps) / med["baseline"]["rps"],
                max(base_rps) / med["baseline"]["rps"],
            ),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE)
    parser.add_argument("--json", type=Path, help="also write the raw runs and summary here")
    parser.add_argument("--services", default="auth,proxy", help="which to measure: auth,proxy")
    # worker mode (internal)
    parser.add_argument("--worker", choices=SERVICES)
    parser.add_argument("--variant", choices=VARIANTS)
    for name in ("database-url", "redis-url", "redis-prefix", "ollama-url", "key"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args()
    if args.requests < 100 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--requests >= 100, --concurrency >= 1, --rounds >= 1")
    if args.worker:
        _worker_main(args)
        return

    from tests.support.otlp import running_otlp_receiver

    services = [s for s in args.services.split(",") if s in SERVICES]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        s: {v: [] for v in VARIANTS} for s in services
    }
    with (
        _baseline_tree(args.baseline_ref) as baseline,
        _stack() as stack,
        running_otlp_receiver() as otlp,
    ):
        for round_no in range(args.rounds):
            order = VARIANTS[round_no % 3 :] + VARIANTS[: round_no % 3]
            for service in services:
                for variant in order:
                    result = _run_worker(service, variant, stack, baseline, otlp.url, args)
                    runs[service][variant].append(result)
                    print(
                        f"round {round_no + 1} {service:5} {variant:8} "
                        f"{result['rps']:8.0f} req/s {result['cpu_us']:7.0f} us CPU/req",
                        flush=True,
                    )
        exported = len(otlp.spans)
    summary = _summary(runs)
    print(f"\nspans received while on: {exported}")
    for service, figures in summary.items():
        low, high = figures["baseline_rps_spread"]
        print(
            f"{service:5} off/baseline: throughput {figures['off_vs_baseline_rps']:.3f}, "
            f"CPU per request {figures['off_vs_baseline_cpu']:.3f}; "
            f"on/off: throughput {figures['on_vs_off_rps']:.3f}, "
            f"CPU {figures['on_vs_off_cpu']:.3f}; "
            f"baseline rounds {low:.2f}..{high:.2f} of their median"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
