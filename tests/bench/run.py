"""``task bench``: start everything, measure, write ``docs/benchmarks.{md,json,png}``.

Order: LiteLLM's install starts in the background (cached in ``.bench/``),
the stack comes up (simulator, Caddy alone, the trivial handler, the full
gateway, the bare chain). While LiteLLM may still install, the ``/authorize``
phases run: against the trivial handler, under other Granian settings (and
the bare auth on RSGI), and on a local Redis Cluster. Then each chat variant
is probed with a real chat (a variant that answers wrongly is reported, not
measured), warm-up, the chat matrix, streaming fidelity and the invalid-key
flood. When a target is missed (or with ``--profile always``), py-spy
profiles auth and proxy under load, for the report.

Run from the repository root: ``python -m tests.bench.run [--seconds 2.5] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench import bench_fleet, bench_tracing, profile, report
from tests.bench.granian_variants import GRANIAN_VARIANTS
from tests.bench.litellm_peer import LiteLLMInstall
from tests.bench.loadgen import HttpTarget, LoadgenError, WrkRun, ensure_wrk
from tests.bench.procs import rss_bytes
from tests.bench.scenarios import BenchConfig, Scenarios, run_fidelity
from tests.bench.stack import REPO_ROOT, BenchStack
from tests.bench.variants import CHAT_VARIANTS, Variant, authorize_headers, probe

__all__ = ["main"]

BENCH_DIR = REPO_ROOT / ".bench"
DOCS = REPO_ROOT / "docs"


_STARTED = time.monotonic()
#: (phase, seconds since the start when it began), in order: the report's phase timings
PHASES: list[tuple[str, float]] = []


def _say(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", flush=True)


def _phase(name: str) -> None:
    """Mark the start of a phase (logged, and timed in ``meta.phases``)."""
    PHASES.append((name, time.monotonic() - _STARTED))
    _say(name)


def _phase_seconds(total: float) -> dict[str, float]:
    ends = [start for _, start in PHASES[1:]] + [total]
    return {name: end - start for (name, start), end in zip(PHASES, ends, strict=True)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds per cell (2.5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternation (3)")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy auth and proxy under load: auto = when a target is missed (default)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument(
        "--tracing-reps",
        type=int,
        default=12,
        help="repetitions of the tracing off/on comparison, after the stack (12; 0 = skip)",
    )
    parser.add_argument(
        "--fleet-seconds",
        type=float,
        default=10.0,
        help="window per side of the fleet scenario, after the stack (10; 0 = skip)",
    )
    parser.add_argument(
        "--out", type=Path, default=DOCS, help="where benchmarks.{md,json,png} go (docs/)"
    )
    return parser


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


async def _probe_all(
    variants: list[Variant], urls: dict[str, str], key: str, chunks: int
) -> dict[str, str]:
    """Each variant must answer a real chat, plain and streamed; returns the failures."""
    failures = {}
    async with aiohttp.ClientSession() as session:
        for variant in variants:
            for stream in (False, True):
                target = variant.target(urls, key, stream=stream)
                problem = await probe(session, target, stream=stream, chunks=chunks)
                if problem:
                    failures[variant.id] = f"{'stream' if stream else 'chat'} probe: {problem}"
                    break
    return failures


def _profile_run(
    py_spy: str,
    stack: BenchStack,
    scenarios: Scenarios,
    *,
    title: str,
    target: HttpTarget,
    services: tuple[str, ...],
    seconds: int,
) -> dict[str, Any]:
    """py-spy ``services`` while wrk drives ``target`` at concurrency 32."""
    out_dir = BENCH_DIR / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = title.split(maxsplit=1)[0].strip("/").lower()
    recorders = {}
    for service in services:
        raw = out_dir / f"{slug}-{service}.txt"
        raw.unlink(missing_ok=True)
        pid = stack.services[service].root_pid
        recorders[service] = (profile.record(py_spy, pid, seconds + 1, raw), raw)
    time.sleep(0.5)  # py-spy attached before the load starts
    calls_before = scenarios.redis_calls()
    run: dict[str, Any] = {"title": title}
    try:
        load = WrkRun(scenarios.wrk, target, connections=32, seconds=seconds).wait()
        run["workload"] = (
            f"wrk, concurrency 32, {seconds} s: {load.rps:.0f} req/s while sampled at 200 Hz "
            "(sampling slows it)."
        )
        calls_after = scenarios.redis_calls()
        run["redis_calls_per_request"] = {
            name: (n - calls_before.get(name, 0)) / load.requests
            for name, n in sorted(calls_after.items())
            if n > calls_before.get(name, 0) and load.requests
        }
    except LoadgenError as exc:
        run["workload"] = f"load failed: {exc}"
    run["services"] = {}
    for service, (proc, raw) in recorders.items():
        _, err = proc.communicate(timeout=seconds + 60)
        if not raw.exists():
            run["services"][service] = {"error": err.decode(errors="replace").strip()[-300:]}
            continue
        summary = profile.summarise(raw)
        summary["file"] = str(raw.relative_to(REPO_ROOT))
        run["services"][service] = summary
    return run


def _profile(stack: BenchStack, scenarios: Scenarios, seconds: int) -> dict[str, Any]:
    """Profiles of ``/authorize`` alone (auth) and of streams through the gateway (auth, proxy)."""
    try:
        py_spy = profile.ensure_py_spy(BENCH_DIR / "tools-venv")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        return {"error": str(exc)}
    runs = []
    if "auth" in stack.urls:
        host = stack.urls.get("gateway", "127.0.0.1").removeprefix("http://")
        target = HttpTarget(
            stack.urls["auth"] + "/authorize", "GET", authorize_headers(stack.key, host)
        )
        runs.append(
            _profile_run(
                py_spy, stack, scenarios, title="/authorize alone (cached valid key)",
                target=target, services=("auth",), seconds=seconds,
            )
        )  # fmt: skip
    variant = next(v for v in CHAT_VARIANTS if v.id == "gateway_native")
    runs.append(
        _profile_run(
            py_spy, stack, scenarios,
            title="streams through the full gateway (20-chunk /api/chat)",
            target=variant.target(stack.urls, stack.key, stream=True),
            services=("auth", "proxy"), seconds=seconds,
        )
    )  # fmt: skip
    variant = next(v for v in CHAT_VARIANTS if v.id == "gateway_responses")
    runs.append(
        _profile_run(
            py_spy, stack, scenarios,
            title="Responses streams through the full gateway (20-chunk /v1/responses)",
            target=variant.target(stack.urls, stack.key, stream=True),
            services=("proxy",), seconds=seconds,
        )
    )  # fmt: skip
    return {"runs": runs}


def _auth_phases(
    stack: BenchStack, scenarios: Scenarios, results: dict[str, Any], config: BenchConfig
) -> None:
    """``/authorize`` alone, under other Granian settings, and on a Redis Cluster."""
    urls = stack.urls
    _phase("/authorize vs the trivial handler")
    results["authorize"] = scenarios.authorize(include_trivial="trivial" in urls)
    _phase("Granian settings: the auth service under each variant, the bare auth on RSGI")
    for name in GRANIAN_VARIANTS:
        stack.start_granian_variant(name)
    stack.start_bare_rsgi()
    sides = [("today", "auth"), *((n, f"granian_{n}") for n in GRANIAN_VARIANTS)]
    sides += [("bare_asgi", "bare_auth"), ("bare_rsgi", "bare_auth_rsgi")]
    # secondary phases (no headline): shorter cells, the same rounds
    short = max(1.0, config.seconds * 0.5)
    results["granian"] = scenarios.authorize_sides(sides, (32,), seconds=short)
    stack.stop_services([f"granian_{n}" for n in GRANIAN_VARIANTS] + ["bare_auth_rsgi"])
    _phase("Redis deployments: /authorize on single Redis and on a local Cluster")
    stack.start_cluster_auth()
    results["redis_deployments"] = scenarios.authorize_sides(
        [("single", "auth"), ("cluster", "auth_cluster")], config.concurrencies, seconds=short
    )
    stack.stop_services(["auth_cluster", "proxy_cluster"])
    stack.stop_cluster()


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark; exit 0 when the report was written."""
    args = _parser().parse_args(argv)
    started = time.monotonic()
    load_start = os.getloadavg()
    os.chdir(REPO_ROOT)
    _phase("setup: wrk, LiteLLM's install started")
    wrk = ensure_wrk()
    install = LiteLLMInstall(BENCH_DIR / "litellm-venv")
    if not args.no_litellm:
        _say("LiteLLM: " + ("cached venv" if install.cached else "installing in the background"))
        install.start()

    state = BENCH_DIR / "last-run"
    shutil.rmtree(state, ignore_errors=True)
    config = BenchConfig(seconds=args.seconds, rounds=args.rounds)
    stack = BenchStack(state, say=_say)
    results: dict[str, Any] = {}
    try:
        _phase("starting the simulator, Caddy (direct), the trivial handler and the gateway")
        stack.start_simulator(config.chunks)
        stack.start_caddy_direct()
        stack.start_trivial()
        stack.start_gateway()
        _say("starting the bare chain (yardstick)")
        stack.start_bare_chain()
        urls = stack.urls
        scenarios = Scenarios(
            wrk=wrk,
            urls=urls,
            services=stack.services,
            gateway_key=stack.key,
            gateway_prefix=stack.key_prefix,
            config=config,
            say=_say,
        )
        # Measured first: these need no LiteLLM, whose first install runs meanwhile.
        installing = not args.no_litellm and not install.cached
        results["litellm_installing_during_auth_phases"] = installing
        if "auth" in urls:
            _auth_phases(stack, scenarios, results, config)
        if not args.no_litellm:
            _phase("waiting for LiteLLM's install")
            problem = install.wait()
            if problem is None:
                _say("starting LiteLLM")
                stack.start_litellm(install)
            else:
                stack.unavailable["litellm"] = problem
        else:
            stack.unavailable["litellm"] = "skipped (--no-litellm)"

        variants = [v for v in CHAT_VARIANTS if v.url_key in urls]
        failures = asyncio.run(_probe_all(variants, urls, stack.key, config.chunks))
        for vid, problem in failures.items():
            _say(f"!! {vid} is not measured: {problem}")
            stack.unavailable[vid] = problem
        variants = [v for v in variants if v.id not in failures]
        for vid, problem in stack.unavailable.items():
            _say(f"!! unavailable: {vid}: {problem.splitlines()[0] if problem else ''}")

        _phase("warm-up")
        scenarios.warm_up(variants)
        _phase("chat matrix")
        results["matrix"] = scenarios.matrix(variants)
        _phase("streaming fidelity")
        results["fidelity"] = run_fidelity(scenarios, variants)
        if "gateway" in urls and not {"gateway_native"} & set(failures):
            _phase("invalid-key flood")
            results["flood"] = scenarios.flood()
        results["memory"] = {
            "peak_rss_bytes": scenarios.peak_rss,
            "hwm_bytes": {n: rss_bytes(s.pids(), peak=True) for n, s in stack.services.items()},
        }
        missed = [h.name for h in report.headlines(results) if h.passed is False]
        wanted = args.profile == "always" or (args.profile == "auto" and missed)
        if wanted and "gateway" in urls:
            _phase("profiling auth and proxy (py-spy)")
            if missed:
                _say(f"missed: {missed}")
            results["profiles"] = _profile(stack, scenarios, seconds=max(5, round(args.seconds)))
    finally:
        _phase("stopping the stack")
        stack.stop()
    if args.fleet_seconds > 0:  # its own stack: three GPU simulators, a gateway on them
        _phase("fleet: three simulated GPUs, the gateway vs round-robin, fair admission")
        try:
            results["fleet"] = bench_fleet.measure(
                bench_fleet.FleetConfig(seconds=args.fleet_seconds),
                state_dir=state / "fleet",
                say=_say,
            )
        except Exception as exc:  # the rest of the report must still be written
            stack.unavailable["fleet"] = f"{type(exc).__name__}: {exc}"
            _say(f"!! fleet not measured: {type(exc).__name__}: {exc}")
    if args.tracing_reps > 0:  # alone on the machine: its own workers, Postgres db, simulator
        _phase("tracing: off against no tracing code, and on")
        try:
            results["tracing"] = bench_tracing.measure(reps=args.tracing_reps, say=_say)
        except Exception as exc:  # the rest of the report must still be written
            stack.unavailable["tracing"] = f"{type(exc).__name__}: {exc}"
            _say(f"!! tracing not measured: {type(exc).__name__}: {exc}")

    _phase("writing the report")
    version_script = "import importlib.metadata as m; print(m.version('litellm'))"
    litellm_python = str(install.venv / "bin" / "python")
    litellm_version = (
        _version([litellm_python, "-c", version_script]) if install.cached else "not installed"
    )
    results["unavailable"] = stack.unavailable
    results["variants"] = {v.id: {"label": v.label, "path": v.path} for v in CHAT_VARIANTS}
    results["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "caddy": _version(["caddy", "version"]),
        "wrk": _version([wrk, "-v"]),
        "litellm_version": litellm_version,
        "seconds": config.seconds,
        "rounds": config.rounds,
        "chunks": config.chunks,
        "flood_connections": config.flood_connections,
        "flood_delay_ms": config.flood_delay_ms,
        "elapsed_seconds": time.monotonic() - started,
        "phases_seconds": _phase_seconds(time.monotonic() - _STARTED),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    results = report.finite(results)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "benchmarks.json")
    report.write_chart(results, args.out / "benchmarks.png")
    report.write_markdown(results, args.out / "benchmarks.md", "benchmarks.png")
    _say(
        f"wrote {args.out / 'benchmarks.md'} (+ .json, .png) in {time.monotonic() - started:.0f} s"
    )
    for head in report.headlines(results):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[head.passed]
        _say(f"  {head.name}: {head.value.median:.3g} (target {head.target}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
