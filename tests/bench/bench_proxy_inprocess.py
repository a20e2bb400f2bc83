"""The proxy's CPU per request in one process, against the bare passthrough: A/B, interleaved.

Service-level A/B runs on a shared, loaded machine scatter by 10 % and more
(Caddy, auth, Granian and other helpers' load all move the batching); here
each side runs its app in a child process of its own, driven by a minimal
ASGI server in the same event loop (no sockets on the client side), and
reports its own CPU time (``getrusage``) per request: what the proxy's code,
its upstream client (aiohttp, to the simulator) and its Redis and Postgres
clients cost, without Granian (whose per-message cost both sides pay alike:
the same number of ``send`` calls).

Sides: ``bare`` (:func:`tests.bench.bare_chain.create_proxy_app`, the
headline's yardstick), ``wt`` (the working tree's ``services/``) and one per
``--base`` ref (``services/`` exported from git). Each request of ours
carries a freshly signed identity with the benchmark's limits (every limit
and budget on, far above reach: reserve and settle run, with a lease id), as
the auth service would hand it over. Per round every side runs once (the
order reverses every other round); the medians close the output, each side
as a ratio to the first.

``--synthetic`` takes the network out too: the upstream answers in-process
(21 canned NDJSON lines, each read one loop iteration after the last, as a
streamed read is) and the pipelined Redis replies in-process with the
scripts' real reply shapes (one iteration later, as a round trip resumes
the caller): what is left is the Python each side runs per request, the
least noisy figure on a shared machine.

``--callgrind`` counts instructions instead of timing (``valgrind
--tool=callgrind``, which must be installed): each side runs twice, with
``--requests`` and three times as many, and the difference per request is
its instructions per request (start-up cancels out). Slow (about 50 times)
but blind to the machine's other load: the figure for cuts worth 1-5 %.
With ``--synthetic`` it is the Python each side runs per request.

Run from the repository root::

    python -m tests.bench.bench_proxy_inprocess --base main --rounds 5
    python -m tests.bench.bench_proxy_inprocess --path /v1/chat/completions --whole
    python -m tests.bench.bench_proxy_inprocess --profile wt   # cProfile of one side

Not collected by pytest; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.git_ref import export_services

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_SECRET = "bench-inprocess-" + "s" * 40
_BIG = 10**15
_BODIES = {
    "/api/chat": {"model": "llama3.2", "messages": [{"role": "user", "content": "hi there"}]},
    "/v1/chat/completions": {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi there"}],
    },
    "/v1/responses": {"model": "llama3.2", "input": "hi there"},
}


# ---------------------------------------------------------------------- the child


class _Client:
    """One request through the app: the scope, a receive, a send that counts.

    ``receive`` returns a future, as Granian's does (its ``PyFutureAwaitable``
    is one to ``asyncio.isfuture``, so ``ensure_future`` makes no task of it):
    the body first, then one that is set to ``http.disconnect`` once the
    answer is complete.
    """

    __slots__ = ("_body", "_loop", "_waiting", "chunks", "status")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._loop = asyncio.get_running_loop()
        self._waiting: list[asyncio.Future[dict[str, Any]]] = []
        self.status = 0
        self.chunks = 0

    def receive(self) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        body, self._body = self._body, b""
        if body:
            future.set_result({"type": "http.request", "body": body, "more_body": False})
        else:
            self._waiting.append(future)
        return future

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.chunks += 1

    def done(self) -> None:
        for future in self._waiting:
            if not future.done():
                future.set_result({"type": "http.disconnect"})
        self._waiting.clear()


def _scope(path: str, body: bytes, identity: str | None) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if identity is not None:
        headers.append((b"x-nz-identity", identity.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def _lifespan(app: Any) -> tuple[asyncio.Task[None], asyncio.Queue[Any]]:
    to_app: asyncio.Queue[Any] = asyncio.Queue()
    from_app: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    message = await from_app.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"startup failed: {message}")
    return task, to_app


def _identity_factory(path: str) -> Any:
    from neuronetz_gateway.domain.identity import Identity, Limits, sign_identity

    route = {
        "/api/chat": "chat",
        "/v1/chat/completions": "v1.chat.completions",
        "/v1/responses": "v1.responses",
    }[path]
    limits = Limits(
        rpm=_BIG, tpm=_BIG, concurrency=_BIG, daily_tokens=_BIG, monthly_tokens=_BIG,
        total_tokens=_BIG,
    )  # fmt: skip
    secret = _SECRET.encode()

    def make() -> str:
        return sign_identity(
            Identity(
                request_id=secrets.token_hex(16),
                tenant_id=1,
                tenant_name="bench",
                key_id=1,
                key_prefix="nz_bench0001",
                route=route,
                expires_at_ms=int(time.time() * 1000) + 60_000,
                key_limits=limits,
                tenant_limits=limits,
                lease_id=secrets.token_hex(8),
            ),
            secret,
        )

    return make


async def _drive(app: Any, args: argparse.Namespace, bare: bool) -> dict[str, Any]:
    body_of: dict[str, Any] = dict(_BODIES[args.path])
    body_of["stream"] = not args.whole
    body = json.dumps(body_of).encode()
    make = None if bare else _identity_factory(args.path)
    failed = 0

    async def one() -> None:
        nonlocal failed
        client = _Client(body)
        scope = _scope(args.path, body, None if make is None else make())
        scope["app"] = app
        try:
            await app(scope, client.receive, client.send)
        finally:
            client.done()
        if client.status != 200 or not client.chunks:
            failed += 1

    async def run(total: int) -> None:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    await run(args.warmup)
    make_cost = _make_cost(make) if make is not None else 0.0
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await run(args.requests)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_out)
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    n = args.requests
    return {
        # the identity signing is the harness's (auth's) work, not the proxy's: taken out
        "cpu_ms": ((user + system) / n - make_cost) * 1000,
        "user_ms": (user / n - make_cost) * 1000,
        "sys_ms": system / n * 1000,
        "rps": n / elapsed,
        "failed": failed,
        "ctx_switches": (after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw) / n,
    }


def _make_cost(make: Any) -> float:
    started = time.process_time()
    for _ in range(500):
        make()
    return (time.process_time() - started) / 500


async def _child(args: argparse.Namespace) -> None:
    bare = args.side == "bare"
    if bare:
        os.environ["NZ_BARE_UPSTREAM"] = os.environ["NZ_OLLAMA_URL"]
        from tests.bench.bare_chain import create_proxy_app

        app = create_proxy_app()
    else:
        from neuronetz_gateway.proxy.app import create_app_from_env

        app = create_app_from_env()
    task, to_app = await _lifespan(app)
    try:
        result = await _drive(app, args, bare)
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 30)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------- synthetic I/O

_WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
_STAMP = "2026-12-04T20:19:57.124951722Z"
_TAGS = json.dumps(
    {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 1920000000}]}
).encode()


def _lines(chunks: int) -> list[bytes]:
    lines = [
        json.dumps(
            {
                "model": "llama3.2",
                "created_at": _STAMP,
                "message": {"role": "assistant", "content": _WORDS[i % len(_WORDS)]},
                "done": False,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(chunks)
    ]
    final = {
        "model": "llama3.2", "created_at": _STAMP,
        "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
        "total_duration": 21600000, "load_duration": 1000000, "prompt_eval_count": 6,
        "prompt_eval_duration": 600000, "eval_count": chunks, "eval_duration": 20000000,
    }  # fmt: skip
    return [*lines, json.dumps(final, separators=(",", ":")).encode() + b"\n"]


def _synthetic(chunks: int) -> None:
    """Upstream and Redis answered in-process (see the module's docstring)."""
    from neuronetz_gateway.adapters import ollama_client, redis_pipeline

    lines = _lines(chunks)
    whole = json.loads(lines[-1])
    whole["message"]["content"] = "".join(_WORDS[i % len(_WORDS)] for i in range(chunks))
    whole_body = json.dumps(whole, separators=(",", ":")).encode()

    def later(value: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, value)
        return future

    class Response:
        backend = "http://127.0.0.1:11434"
        status = 200

        def __init__(self, stream: bool, body: bytes) -> None:
            self.content_type = "application/x-ndjson" if stream else "application/json"
            self._body = body

        async def read(self) -> bytes:
            return bytes(await later(self._body))

        async def chunks(self) -> Any:
            for line in lines:
                yield await later(line)

        def release(self) -> None:
            pass

        def abort(self) -> None:
            pass

    async def send(self: Any, method: str, path: str, body: bytes | None = None, **_: Any) -> Any:
        if path == "/api/tags":
            return await later(Response(False, _TAGS))
        stream = body is not None and b'"stream":false' not in body
        return await later(Response(stream, whole_body))

    ollama_client.OllamaClient.send = send  # type: ignore[method-assign]

    # the scripts' replies (recorded from a real run): decide (reserve), settle, lease
    limits = [-1, 41420, 41420, 41420, 41420, -1, 1796415582]
    decide = [b"ok", limits, limits, []]

    # what the side's evalsha encodes (a --base from before pack_evalsha: the whole command)
    pack_evalsha = getattr(
        redis_pipeline,
        "pack_evalsha",
        lambda sha, keys, args: redis_pipeline._pack(("EVALSHA", sha, len(keys), *keys, *args)),
    )

    async def evalsha(self: Any, sha: str, script: str, keys: Any, args: Any) -> Any:
        self._packed = pack_evalsha(sha, keys, args)
        if args[0] in ("reserve", "admit"):
            return await later(decide)
        # settle: both levels' usage (read when the headers are still to be sent), or a lease
        return await later([limits, limits] if len(args) > 5 and args[5] == "1" else [])

    async def execute(self: Any, *args: Any) -> Any:
        self._packed = redis_pipeline._pack(args)
        return await later(b"OK" if args[0] == "SET" else b"PONG")

    redis_pipeline.PipelinedRedis.evalsha = evalsha  # type: ignore[method-assign]
    redis_pipeline.PipelinedRedis.execute = execute  # type: ignore[method-assign]


# ---------------------------------------------------------------------- the parent


def _run_side(
    side: str,
    services: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    profile: str = "",
    requests: int | None = None,
    valgrind: Path | None = None,
) -> dict[str, Any]:
    prelude = args.variants.get(side, "")
    argv = [
        sys.executable, "-m", "tests.bench.bench_proxy_inprocess", "--child", side,
        "--path", args.path, "--concurrency", str(args.concurrency),
        "--requests", str(requests or args.requests), "--warmup", str(args.warmup),
        "--chunks", str(args.chunks),
    ]  # fmt: skip
    if args.synthetic:
        argv.append("--synthetic")
    if args.whole:
        argv.append("--whole")
    if profile:
        argv += ["--profile-out", profile]
    if prelude:
        argv += ["--prelude", prelude]
    if valgrind is not None:
        out = f"--callgrind-out-file={valgrind}"
        argv = ["valgrind", "--tool=callgrind", "--dump-line=no", out, *argv]
    child_env = {**env, "PYTHONPATH": f"{services}{os.pathsep}{REPO_ROOT}"}
    done = subprocess.run(
        argv, env=child_env, cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    raise RuntimeError(f"side {side} failed ({done.returncode}):\n{done.stderr[-3000:]}")


async def _database(admin: str) -> str:
    import asyncpg

    from neuronetz_gateway.adapters.postgres.migrate import apply_migrations

    name = f"nz_inproc_{int(time.time())}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = admin.rsplit("/", 1)[0] + "/" + name
    await apply_migrations(url)
    return url


def _parent(args: argparse.Namespace) -> None:
    from tests.support.proxy_stack import running_simulator
    from tests.support.servers import postgres_admin_url, redis_url

    state = Path(tempfile.mkdtemp(prefix="nz-inproc-"))
    sides: dict[str, Path] = {}
    if not args.profile and not args.no_bare:
        sides["bare"] = REPO_ROOT / "services"
    for ref in args.base or []:
        sides[ref.replace("/", "_")[:12]] = export_services(ref, state / f"base-{len(sides)}")
    sides["wt"] = REPO_ROOT / "services"
    for name in args.variants:
        sides[name] = REPO_ROOT / "services"
    with postgres_admin_url() as admin, redis_url() as redis:
        database = asyncio.run(_database(admin))
        with running_simulator(NZ_SIM_RECORD="0", NZ_SIM_CHUNKS=str(args.chunks)) as sim:
            env = {k: v for k, v in os.environ.items() if not k.startswith("NZ_")}
            env.update(
                NZ_DATABASE_URL=database,
                NZ_REDIS_URL=redis,
                NZ_REDIS_PREFIX=f"nzinproc{secrets.token_hex(3)}",
                NZ_OLLAMA_URL=sim.url,
                NZ_GATEWAY_SECRET=_SECRET,
                NZ_AUDIT_SPOOL_DIR=str(state / "spool"),
                NZ_LOG_FORMAT="json",
                NZ_DISCOVERY_TTL_SECONDS="10",
            )
            if args.profile:
                out = state / f"profile-{args.profile}.pstats"
                services = sides.get(args.profile, REPO_ROOT / "services")
                result = _run_side(args.profile, services, env, args, profile=str(out))
                print(json.dumps(result))
                import pstats

                stats = pstats.Stats(str(out))
                stats.sort_stats("tottime").print_stats(args.top)
                stats.sort_stats("cumulative").print_stats(args.top)
                print(f"pstats: {out}")
                return
            if args.callgrind:
                _callgrind(sides, env, args, state)
                return
            cells: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
            for rnd in range(args.rounds):
                order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
                for side in order:
                    cell = _run_side(side, sides[side], env, args)
                    cells[side].append(cell)
                    shown = " ".join(f"{k}={v:.4g}" for k, v in cell.items())
                    print(f"round {rnd} {side:12}: {shown}", flush=True)
    names = list(sides)
    first = names[0]
    print(f"\nmedians over {args.rounds} rounds; ratio: per round to {first}, then the median")
    for side in names:
        runs = cells[side]
        med = {k: statistics.median(c[k] for c in runs) for k in runs[0]}
        ratios = [c["cpu_ms"] / b["cpu_ms"] for b, c in zip(cells[first], runs, strict=True)]
        shown = " ".join(f"{k}={v:.4g}" for k, v in med.items())
        least = min(c["cpu_ms"] for c in runs)
        print(f"{side:12}: {shown} cpu_min={least:.4g} cpu_ratio={statistics.median(ratios):.3f}")
    for name in args.variants:
        deltas = [c["cpu_ms"] - w["cpu_ms"] for w, c in zip(cells["wt"], cells[name], strict=True)]
        least = min(c["cpu_ms"] for c in cells[name]) - min(c["cpu_ms"] for c in cells["wt"])
        print(
            f"{name} vs wt: cpu_ms delta median {statistics.median(deltas):+.4f}, of the minima"
            f" {least:+.4f}"
            f" (per round {', '.join(f'{d:+.3f}' for d in deltas)})"
        )
    if args.base:
        previous = names[names.index("wt") - 1]
        deltas = [
            c["cpu_ms"] - b["cpu_ms"] for b, c in zip(cells[previous], cells["wt"], strict=True)
        ]
        ratios = [
            c["cpu_ms"] / b["cpu_ms"] for b, c in zip(cells[previous], cells["wt"], strict=True)
        ]
        print(
            f"wt vs {previous}: cpu_ms delta median {statistics.median(deltas):+.4f}"
            f" (per round {', '.join(f'{d:+.3f}' for d in deltas)}),"
            f" ratio median {statistics.median(ratios):.3f}"
        )


def _instructions(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _callgrind(
    sides: dict[str, Path], env: dict[str, str], args: argparse.Namespace, state: Path
) -> None:
    """Instructions per request per side: (runs of 3n and n requests) / 2n."""
    small, large = args.requests, 3 * args.requests
    per_request: dict[str, float] = {}
    for side, services in sides.items():
        counts = []
        for n in (small, large):
            out = state / f"callgrind-{side}-{n}.out"
            result = _run_side(side, services, env, args, requests=n, valgrind=out)
            counts.append(_instructions(out))
            if result["failed"]:
                raise RuntimeError(f"side {side}: {result['failed']} requests failed")
        per_request[side] = (counts[1] - counts[0]) / (large - small)
        print(f"{side:12}: {per_request[side]:,.0f} instructions per request", flush=True)
    if "wt" in per_request:
        for side, count in per_request.items():
            print(f"{side:12}: {count / per_request['wt']:.4f} of wt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_proxy_inprocess")
    parser.add_argument("--base", action="append", help="git ref of a side (repeatable)")
    parser.add_argument("--path", default="/api/chat", choices=sorted(_BODIES))
    parser.add_argument("--whole", action="store_true", help="non-streamed answers")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--synthetic", action="store_true", help="upstream and Redis in-process")
    parser.add_argument("--callgrind", action="store_true", help="instructions per request")
    parser.add_argument("--no-bare", action="store_true", help="without the bare side")
    parser.add_argument("--profile", default="", help="cProfile this side instead of the A/B")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a side NAME: the working tree with FILE (Python) run first in its process",
    )
    parser.add_argument("--prelude", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = dict(v.split("=", 1) for v in args.variant)
    if args.child:
        args.side = args.child
        if args.synthetic:
            _synthetic(args.chunks)
        if args.prelude:  # a variant: its file runs first (patches to price a part)
            code = Path(args.prelude).read_text()
            exec(compile(code, args.prelude, "exec"), {"__name__": "prelude"})  # noqa: S102
        import uvloop  # the services' loop (Granian's ``auto`` picks it)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_child(args))
    else:
        _parent(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
