"""A/B of the hot path: the services at a base commit against the working tree, interleaved.

One simulator, Postgres and Redis; two gateways (auth, proxy, the repository's
Caddy), one per ``--base`` ref (``services/`` exported from git, in the order
given), then the working tree (``wt``). Each round runs every scenario on
every side (the order reverses every other round), wrk at concurrency 32
(``--connections``), 20-chunk streams (``--whole``: non-streamed answers);
per cell: req/s, p50 latency and the CPU of the auth and proxy process trees
per request (ms), and of the Redis they share (cells run one at a time), with
the 1-minute load average at the end of the cell. ``--bare`` adds the bare
chain (:mod:`tests.bench.bare_chain`, the headline's yardstick) as a last
side of the ``native`` scenario. The medians
close the output, each side's as a ratio to the side before it (per round,
then the median), so ``--base main --base <cut1>`` prices cut 1 and the rest.

``--profile`` instead samples the working tree with py-spy under each scenario and
prints the top own-time and inclusive frames.

Run from the repository root::

    python -m tests.bench.ab_hot_path --base main --base HEAD~1 --rounds 3 --seconds 3
    python -m tests.bench.ab_hot_path --base main --bare --scenarios native openai
    python -m tests.bench.ab_hot_path --profile --seconds 6
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from neuronetz_gateway.devstack.servers import free_port
from tests.bench import profile
from tests.bench.git_ref import export_services
from tests.bench.loadgen import HttpTarget, WrkRun, ensure_wrk
from tests.bench.procs import ServiceProcess
from tests.bench.stack import REPO_ROOT, BenchStack, _answers
from tests.bench.variants import CHAT_VARIANTS, authorize_headers

__all__ = ["main"]

STATE = REPO_ROOT / ".bench" / "ab-hot-path"
SCENARIOS = ("authorize", "native", "openai", "responses")
_VARIANT = {
    "native": "gateway_native",
    "openai": "gateway_openai",
    "responses": "gateway_responses",
}


def _say(message: str) -> None:
    print(message, flush=True)


def _start_side(stack: BenchStack, side: str, services: Path) -> dict[str, str]:
    """auth, proxy and Caddy for one side; returns its URLs."""
    env = {**stack._gateway_env, "PYTHONPATH": f"{services}{os.pathsep}{REPO_ROOT}"}
    check = subprocess.run(
        [stack.python, "-c", "import neuronetz_gateway as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not check.startswith(str(services)):
        raise RuntimeError(f"side {side} imports {check}, not {services}")
    ports = {}
    for service in ("auth", "proxy"):
        ports[service] = free_port()
        argv = [stack.python, "-m", "neuronetz_gateway.cli", "serve", service]
        stack._spawn(f"{service}_{side}", [*argv, "--port", str(ports[service])], env)
    urls = {}
    for service in ("auth", "proxy"):
        url = f"http://127.0.0.1:{ports[service]}"
        child = next(c for c in stack._children if c.name == f"{service}_{side}")
        stack._wait(child, functools.partial(_answers, f"{url}/readyz", 200), f"{service}_{side}")
        urls[service] = url
    urls["gateway"] = stack._start_caddy(f"gw_{side}", ports["auth"], ports["proxy"])
    return urls


#: The bare chain's side (``--bare``): its processes are ``bare_auth`` and ``bare_proxy``.
BARE = "bare"


def _target(scenario: str, urls: dict[str, str], key: str, *, stream: bool = True) -> HttpTarget:
    if scenario == "authorize":
        host = urls["gateway"].removeprefix("http://")
        return HttpTarget(urls["auth"] + "/authorize", "GET", authorize_headers(key, host))
    variant = next(v for v in CHAT_VARIANTS if v.id == _VARIANT[scenario])
    return variant.target(urls, key, stream=stream)


def _cell(
    wrk: str,
    target: HttpTarget,
    procs: dict[str, ServiceProcess],
    seconds: float,
    connections: int,
) -> dict[str, Any]:
    before = {name: p.cpu() for name, p in procs.items()}
    result = WrkRun(wrk, target, connections=connections, seconds=seconds).wait()
    after = {name: p.cpu() for name, p in procs.items()}
    n = max(1, result.requests)
    cell: dict[str, Any] = {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "failed": result.failed,
        "load1": os.getloadavg()[0],
    }
    for name in procs:
        cell[f"{name}_ms"] = (after[name] - before[name]) * 1000 / n
    return cell


def _procs(stack: BenchStack, scenario: str, side: str) -> dict[str, ServiceProcess]:
    names = ("auth", "proxy") if scenario != "authorize" else ("auth",)
    procs = {
        name: stack.services[f"{BARE}_{name}" if side == BARE else f"{name}_{side}"]
        for name in names
    }
    # one Redis for every side: a cell's Redis CPU is its side's alone
    procs["redis"] = stack.services["redis"]
    return procs


def _sides_of(sides: dict[str, dict[str, str]], scenario: str) -> list[str]:
    """The sides that run ``scenario`` (the bare chain serves ``native`` only)."""
    return [side for side in sides if side != BARE or scenario == "native"]


def _ab(stack: BenchStack, sides: dict[str, dict[str, str]], args: argparse.Namespace) -> None:
    """Interleaved rounds over ``sides`` (in order); each side's ratio is to the one before."""
    wrk = ensure_wrk()
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    stream = not args.whole
    for scenario in args.scenarios:  # warm-up
        for side in _sides_of(sides, scenario):
            target = _target(scenario, sides[side], stack.key, stream=stream)
            WrkRun(wrk, target, connections=args.connections, seconds=1).wait()
    for rnd in range(args.rounds):
        for scenario in args.scenarios:
            order = _sides_of(sides, scenario)
            if rnd % 2:
                order.reverse()
            for side in order:
                procs = _procs(stack, scenario, side)
                target = _target(scenario, sides[side], stack.key, stream=stream)
                cell = _cell(wrk, target, procs, args.seconds, args.connections)
                cells.setdefault((scenario, side), []).append(cell)
                shown = " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items()
                )
                _say(f"round {rnd} {scenario:9} {side:8}: {shown}")
                time.sleep(0.3)
    summary: dict[str, Any] = {}
    _say("\nmedians per side, and each side / the one before it (per round, then the median):")
    for scenario in args.scenarios:
        row: dict[str, Any] = {}
        names = _sides_of(sides, scenario)
        for index, side in enumerate(names):
            runs = cells[(scenario, side)]
            med: dict[str, Any] = {
                k: statistics.median(c[k] for c in runs) for k in runs[0] if k != "failed"
            }
            med["failed"] = sum(c["failed"] for c in runs)
            if index:
                before = cells[(scenario, names[index - 1])]
                for k in [k for k in runs[0] if k.endswith("_ms") or k == "rps"]:
                    per_round = [b[k] / a[k] for a, b in zip(before, runs, strict=True) if a[k]]
                    med[f"{k}_ratio"] = statistics.median(per_round)
            row[side] = med
            shown = " ".join(f"{k}={v:.4g}" for k, v in med.items())
            _say(f"{scenario:9} {side:8}: {shown}")
        summary[scenario] = row
    out = STATE / f"ab-summary-{args.tag}.json"
    out.write_text(json.dumps(summary, indent=2))
    _say(f"wrote {out}")


def _profile(stack: BenchStack, urls: dict[str, str], args: argparse.Namespace) -> None:
    wrk = ensure_wrk()
    py_spy = (
        os.environ.get("PY_SPY")
        or shutil.which("py-spy")
        or profile.ensure_py_spy(REPO_ROOT / ".bench" / "tools-venv")
    )
    runs = [(scenario, "wt") for scenario in args.scenarios]
    if args.bare and "native" in args.scenarios:
        runs.append(("native", BARE))
    for scenario, side in runs:
        services = ("auth",) if scenario == "authorize" else ("auth", "proxy")
        recorders = {}
        for service in services:
            raw = STATE / f"profile-{args.tag}-{scenario}-{side}-{service}.txt"
            raw.unlink(missing_ok=True)
            name = f"{BARE}_{service}" if side == BARE else f"{service}_{side}"
            pid = stack.services[name].root_pid
            recorders[service] = (profile.record(py_spy, pid, int(args.seconds) + 1, raw), raw)
        time.sleep(0.5)
        target = _target(
            scenario,
            {"gateway": stack.urls[BARE]} if side == BARE else urls,
            stack.key,
            stream=not args.whole,
        )
        load = WrkRun(wrk, target, connections=args.connections, seconds=args.seconds).wait()
        _say(
            f"\n=== {scenario} {side}: {load.rps:.0f} req/s under sampling,"
            f" load1 {os.getloadavg()[0]:.2f}"
        )
        for service, (proc, raw) in recorders.items():
            proc.communicate(timeout=args.seconds + 60)
            summary = profile.summarise(raw, top=args.top)
            _say(f"--- {service} ({summary['samples']} samples) {raw}")
            _say("  self:      " + "; ".join(f"{f} {s:.1%}" for f, s in summary["self"]))
            _say("  ours incl: " + "; ".join(f"{f} {s:.1%}" for f, s in summary["ours"]))
            _say("  libs incl: " + "; ".join(f"{f} {s:.1%}" for f, s in summary["inclusive"]))


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run the A/B (or the profiles), stop everything."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ab_hot_path", description=__doc__)
    parser.add_argument(
        "--base", action="append", help="git ref of a side before the working tree (repeatable)"
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--profile", action="store_true", help="py-spy side B instead of the A/B")
    parser.add_argument("--tag", default="now", help="profile file name tag")
    parser.add_argument("--connections", type=int, default=32, help="wrk's concurrency")
    parser.add_argument("--whole", action="store_true", help="non-streamed answers")
    parser.add_argument(
        "--bare", action="store_true", help="the bare chain as a last side of native"
    )
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    state = STATE / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    stack = BenchStack(state, say=_say)
    try:
        stack.start_simulator(20)
        stack.start_gateway()  # Postgres, Redis, the key (and a gateway we do not use)
        if "gateway" not in stack.urls:
            raise RuntimeError(f"gateway: {stack.unavailable.get('gateway')}")
        if args.bare:
            stack.start_bare_chain()  # (needs the gateway's auth for its identity)
            if "bare" not in stack.urls:
                raise RuntimeError(f"bare chain: {stack.unavailable.get('bare_chain')}")
        stack.stop_services(["caddy_gateway", "auth", "proxy"])
        if args.profile:
            _profile(stack, _start_side(stack, "wt", REPO_ROOT / "services"), args)
        else:
            sides = {}
            for ref in args.base or ["main"]:
                label = ref.replace("/", "_")[:8]
                services = export_services(ref, state / f"base-{label}")
                sides[label] = _start_side(stack, label, services)
            sides["wt"] = _start_side(stack, "wt", REPO_ROOT / "services")
            if args.bare:
                sides[BARE] = {"gateway": stack.urls["bare"]}
            _ab(stack, sides, args)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
