"""Benchmark: what tracing costs, off and on, in auth and in the proxy.

Every variant is one long-lived worker process that runs the service's app
in-process and calls it as ASGI (no sockets in front): auth answers
``GET /authorize`` for a cached key (one Redis round trip each), the proxy a
non-streaming ``POST /api/chat`` with a fresh signed identity to the bundled
simulator. The driver asks the workers in turn for short batches, rotating
the order each repetition, so neighbouring batches of two variants see the
same machine; the figure is the worker's CPU time per request
(``time.process_time``: the service's own work, every thread of it, the
exporter's included, and not the other users of this shared machine), and
each ratio is the median over repetitions of the ratio of two variants'
batches in the same repetition.

- ``before``: the tree of ``--before-ref`` (main just before tracing landed);
- ``before_again``: the same tree in a second process: ``before_again`` ÷
  ``before`` is the method's own noise (an A/A test), what a ratio must
  exceed to mean anything;
- ``landed_off``: the tree of ``--landed-ref`` (the merge that added tracing,
  nothing else), ``OTEL_*`` unset: ``landed_off`` ÷ ``before`` is what the
  tracing code costs when off, with no other change in between;
- ``off`` and ``on``: this tree, ``OTEL_*`` unset, and spans exported by the
  SDK's batch processor over OTLP/HTTP to a local receiver (in the driver,
  decoding every export): ``on`` ÷ ``off``.

Old trees come from ``git archive`` and go first on ``PYTHONPATH``; same
virtualenv, Postgres, Redis and simulator for all.

    .venv/bin/python -m tests.bench.bench_tracing --batch 200 --reps 30
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
SECRET = "bench-secret-" + "z" * 40
#: main right before "OpenTelemetry traces" landed, and the merge that landed it
DEFAULT_BEFORE = "b53cd76"
DEFAULT_LANDED = "296936a"
VARIANTS = ("before", "before_again", "landed_off", "off", "on")
#: which tree each variant runs (None: this one) and whether tracing is on
TREES = {"before": "before", "before_again": "before", "landed_off": "landed"}
SERVICES = ("auth", "proxy")
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
#: the ratios reported: name -> (numerator, denominator)
RATIOS = {
    "noise": ("before_again", "before"),
    "off_cost": ("landed_off", "before"),
    "on_vs_off": ("on", "off"),
}

Call = Callable[[], Awaitable[int]]


# -- the worker (one variant of one service, in its own process, batches on request) -------


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


async def _batch(call: Call, requests: int, concurrency: int) -> dict[str, float]:
    statuses: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            statuses.append(await call())

    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    gc.collect()  # every batch starts from the same heap state, in every variant
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in share if n))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    bad = sum(1 for s in statuses if s != 200)
    if bad:
        raise RuntimeError(f"{bad} of {len(statuses)} answers were not 200")
    return {"cpu_us": cpu / requests * 1e6, "rps": requests / wall}


async def _serve_batches(call: Call, args: argparse.Namespace) -> None:
    """Warm up, say ``ready``, then one batch per ``run`` line on stdin, its figures back.

    Answers go to the original stdout, which only this uses: the worker's fd 1 now
    points at stderr, so the service's own log lines cannot get in between.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    await _batch(call, args.warmup, args.concurrency)
    print("ready", file=answers)
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if line != "run":
            return
        print(json.dumps(await _batch(call, args.batch, args.concurrency)), file=answers)


def _tracing(variant: str, service: str) -> Any:
    if variant != "on":
        return None
    from neuronetz_gateway.tracing import tracing_from_env

    return tracing_from_env(service)


async def _auth_worker(args: argparse.Namespace) -> None:
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
            await _serve_batches(call, args)
    finally:
        await pool.close()
        if tracing is not None:
            tracing.shutdown()


async def _proxy_worker(args: argparse.Namespace) -> None:
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
            await _serve_batches(call, args)
    finally:
        if tracing is not None:
            tracing.shutdown()


def _worker_main(args: argparse.Namespace) -> None:
    import uvloop

    run = _auth_worker if args.worker == "auth" else _proxy_worker
    uvloop.run(run(args))


# -- the driver ----------------------------------------------------------------------------


@contextmanager
def _archived_tree(ref: str) -> Iterator[Path]:
    archive = subprocess.run(
        ["git", "archive", ref, "services/neuronetz_gateway"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="nz-bench-tree-") as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / "services"


@contextmanager
def _stack() -> Iterator[dict[str, str]]:
    """Postgres (a fresh migrated database), Redis, the simulator, a key."""
    import asyncpg

    from neuronetz_gateway.adapters.hashing import KeyHasher
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

        async def create() -> None:
            conn = await asyncpg.connect(admin)
            await conn.execute(f'CREATE DATABASE "{name}"')
            await conn.close()

        def migrate() -> None:
            # in a process of its own: piccolo keeps one engine per process, and `task bench`
            # migrated its own (by now stopped) database in this one before
            cli = Path(sys.executable).parent / "neuronetz-gateway"
            subprocess.run(
                [str(cli), "migrate"], env={**os.environ, "NZ_DATABASE_URL": database},
                cwd=ROOT, capture_output=True, check=True, timeout=300,
            )  # fmt: skip

        async def prepare() -> str:
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

        asyncio.run(create())
        migrate()
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


class _Worker:
    """One variant's worker process: warmed up, then a batch per :meth:`run`."""

    def __init__(self, service: str, variant: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = f"{service}/{variant}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True,
        )  # fmt: skip
        self._expect("ready")

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        return self._proc.stdin, self._proc.stdout

    def _expect(self, what: str | None) -> str:
        line = self._pipes()[1].readline().strip()
        if not line or (what is not None and line != what):
            self._proc.kill()
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} failed (said {line[:200]!r}):\n{tail}")
        return line

    def run(self) -> dict[str, float]:
        stdin, _ = self._pipes()
        stdin.write("run\n")
        stdin.flush()
        result: dict[str, float] = json.loads(self._expect(None))
        return result

    def close(self) -> None:
        stdin, _ = self._pipes()
        try:
            stdin.write("stop\n")
            stdin.close()
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
        self._log.close()


def _start_worker(
    service: str,
    variant: str,
    stack: Mapping[str, str],
    trees: Mapping[str, Path],
    otlp_url: str,
    args: argparse.Namespace,
) -> _Worker:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "NZ_"))}
    tree = TREES.get(variant)
    if tree is not None:
        env["PYTHONPATH"] = str(trees[tree])
    if variant == "on":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_url
    argv = [
        sys.executable, "-m", "tests.bench.bench_tracing",
        "--worker", service, "--variant", variant,
        "--batch", str(args.batch), "--warmup", str(args.warmup),
        "--concurrency", str(args.concurrency),
        "--redis-prefix", f"nzb{secrets.token_hex(3)}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in stack.items()),
    ]  # fmt: skip
    return _Worker(service, variant, argv, env)


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: two order statistics.

    The k-th smallest and k-th largest of n values, with k the largest for which
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2: no assumption about the shape of the
    noise, only that repetitions are independent.
    """
    ordered = sorted(values)
    n = len(ordered)
    tail, k, below = (1 - level) / 2, 0, 0.0
    while k < n:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3 if values else (float("nan"),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(runs: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> dict[str, Any]:
    """Per service: medians of CPU/request and each ratio's quartiles over repetitions."""
    summary: dict[str, Any] = {}
    for service, by_variant in runs.items():
        figures: dict[str, Any] = {
            "cpu_us_median": {
                v: statistics.median(r["cpu_us"] for r in rs) for v, rs in by_variant.items() if rs
            }
        }
        for name, (top, bottom) in RATIOS.items():
            pairs = list(zip(by_variant.get(top, ()), by_variant.get(bottom, ()), strict=False))
            ratios = [a["cpu_us"] / b["cpu_us"] for a, b in pairs]
            if ratios:
                q1, median, q3 = _quartiles(ratios)
                low, high = median_interval(ratios)
                figures[name] = {
                    "median": median, "ci95": [low, high], "q1": q1, "q3": q3,
                    "min": min(ratios), "max": max(ratios), "n": len(ratios),
                }  # fmt: skip
        summary[service] = figures
    return summary


def measure(
    *,
    batch: int = 200,
    reps: int = 30,
    warmup: int = 200,
    concurrency: int = 16,
    services: Sequence[str] = SERVICES,
    before_ref: str = DEFAULT_BEFORE,
    landed_ref: str = DEFAULT_LANDED,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the comparison; the raw batches, the summary and how it was measured."""
    from tests.support.otlp import running_otlp_receiver

    args = argparse.Namespace(batch=batch, warmup=warmup, concurrency=concurrency)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    started = time.monotonic()
    with (
        _archived_tree(before_ref) as before,
        _archived_tree(landed_ref) as landed,
        _stack() as stack,
        running_otlp_receiver() as otlp,
    ):
        trees = {"before": before, "landed": landed}
        for service in services:
            runs[service] = {v: [] for v in VARIANTS}
            workers: dict[str, _Worker] = {}
            try:
                for variant in VARIANTS:
                    workers[variant] = _start_worker(service, variant, stack, trees, otlp.url, args)
                for rep in range(reps):
                    shift = rep % len(VARIANTS)
                    for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                        runs[service][variant].append(workers[variant].run())
                    if (rep + 1) % 10 == 0 or rep + 1 == reps:
                        say(f"  tracing {service}: {rep + 1}/{reps} repetitions")
            finally:
                for worker in workers.values():
                    worker.close()
        exported = len(otlp.spans)
    return {
        "method": {
            "batch": batch, "reps": reps, "warmup": warmup, "concurrency": concurrency,
            "before_ref": before_ref, "landed_ref": landed_ref, "variants": list(VARIANTS),
            "spans_received_while_on": exported, "elapsed_seconds": time.monotonic() - started,
        },
        "runs": runs,
        "summary": summarise(runs),
    }  # fmt: skip


def _ratio_text(figure: Mapping[str, Any] | None) -> str:
    if not figure:
        return "not measured"
    low, high = figure["ci95"]
    return (
        f"{figure['median']:.3f} (95 % CI {low:.3f}-{high:.3f}; "
        f"quartiles {figure['q1']:.3f}-{figure['q3']:.3f})"
    )


def markdown_lines(tracing: Mapping[str, Any] | None) -> list[str]:
    """The benchmark report's section on tracing (nothing when it was not measured)."""
    if not tracing:
        return []
    method, summary = tracing["method"], tracing["summary"]
    lines = [
        "",
        "## Tracing: off against no tracing code, and on",
        "",
        f"CPU time per request of the service process (`time.process_time`, all its threads), "
        f"calling the app in-process as ASGI: auth a cached `/authorize`, the proxy a "
        f"non-streaming `/api/chat` to the simulator. One long-lived worker per variant, "
        f"{method['reps']} repetitions of a {method['batch']}-request batch each (concurrency "
        f"{method['concurrency']}), the variants' order rotating every repetition; a ratio is "
        "the median over repetitions of two variants' batches in the same repetition, with a 95 % "
        "confidence interval of that median (order statistics, no assumption about the noise's "
        "shape) and the quartiles of the ratios. "
        f"`before` is `{method['before_ref']}` (main just before tracing), "
        f"`landed_off` `{method['landed_ref']}` (the merge that added it, off); `before_again` is "
        "`before` in a second process, so its ratio is the method's own noise.",
        "",
        "| service | noise: before_again ÷ before | off: landed_off ÷ before "
        "| on ÷ off (this tree) | CPU µs/request: before, landed_off, off, on |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for service, figures in summary.items():
        cpu = figures.get("cpu_us_median", {})
        cpus = ", ".join(f"{cpu[v]:.0f}" for v in ("before", "landed_off", "off", "on") if v in cpu)
        lines.append(
            f"| {service} | {_ratio_text(figures.get('noise'))} "
            f"| {_ratio_text(figures.get('off_cost'))} | {_ratio_text(figures.get('on_vs_off'))} "
            f"| {cpus} |"
        )
    lines += ["", f"Spans received while on: {method['spans_received_while_on']}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=200, help="requests per batch (200)")
    parser.add_argument("--reps", type=int, default=30, help="batches per variant (30)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the first batch")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--before-ref", default=DEFAULT_BEFORE)
    parser.add_argument("--landed-ref", default=DEFAULT_LANDED)
    parser.add_argument("--json", type=Path, help="also write the raw runs and summary here")
    parser.add_argument("--services", default="auth,proxy", help="which to measure: auth,proxy")
    # worker mode (internal)
    parser.add_argument("--worker", choices=SERVICES)
    parser.add_argument("--variant", choices=VARIANTS)
    for name in ("database-url", "redis-url", "redis-prefix", "ollama-url", "key"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args()
    if args.batch < 20 or args.concurrency < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--batch >= 20, --concurrency >= 1, --reps >= 1, --warmup >= 0")
    if args.worker:
        _worker_main(args)
        return
    result = measure(
        batch=args.batch,
        reps=args.reps,
        warmup=args.warmup,
        concurrency=args.concurrency,
        services=[s for s in args.services.split(",") if s in SERVICES],
        before_ref=args.before_ref,
        landed_ref=args.landed_ref,
    )
    print("\n".join(markdown_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
