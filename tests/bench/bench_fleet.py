"""The fleet scenario of issue 15 (``task bench:fleet``, and a phase of ``task bench``).

Three simulated GPUs (:mod:`neuronetz_gateway.simulator.gpu`), each with 4
slots (``--slots``; one model loaded at a time, ``--max-loaded 1``, so 4 is
what the GPU runs at once), a fixed token rate, a cold load of
``--load-seconds`` for a model that is not loaded, and ``--max-queue`` small
enough that an overloaded backend answers Ollama's 503. Different model
sets, one model of each loaded at the start:

- ``gpu-a``: llama3.2 (loaded), qwen2.5;
- ``gpu-b``: llama3.2, mistral (loaded);
- ``gpu-c``: qwen2.5 (loaded), mistral.

Closed-loop clients (streaming ``/api/chat``, a mix of the three models;
a refused request is asked again, same model, after ``backoff``) drive the same simulators through

- the full gateway (Caddy, auth, proxy; the three defined as backends of 4
  slots: pool routing, slot admission, the fair queue), and
- the round-robin baseline (:mod:`tests.bench.round_robin`: a plain
  passthrough, round-robin among the backends that have the model),

one after the other, the simulators reset in between. Measured from the
simulators' side (``/_sim/stats``, deltas over the window): busy slot-seconds
(slots held while generating, integrated over time) ÷ available
slot-seconds (3 x 4 x the window) = utilisation; Ollama's 503s (a full
queue) = requests refused by a backend; cold loads, and those that waited for
a busy model to finish first (``eviction_waits``); the loaded model of each
backend, sampled from ``/api/ps`` (how often it changed, and the share of
the window each model held it). From the clients' side:
answers by status, completed requests per second, latency.

The light-tenant figure (a) is :mod:`tests.bench.bench_fair_queue`'s (the
real ``SlotAdmission`` on the run's Redis, fair queue vs FIFO), run here and
reported in the same section.

Run: ``python -m tests.bench.bench_fleet [--seconds 15] [--out docs]`` writes
``benchmarks-fleet.{md,json}`` there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from neuronetz_gateway.domain.backends import BackendSpec
from tests.bench import bench_fair_queue
from tests.bench.stack import REPO_ROOT, BenchStack
from tests.bench.stats import percentile

__all__ = ["FleetConfig", "main", "markdown_lines", "measure"]

LLAMA, QWEN, MISTRAL = "llama3.2:latest", "qwen2.5:0.5b", "mistral:7b"
#: name -> (installed models, the one loaded at start)
BACKENDS = {
    "gpu-a": ((LLAMA, QWEN), LLAMA),
    "gpu-b": ((LLAMA, MISTRAL), MISTRAL),
    "gpu-c": ((QWEN, MISTRAL), QWEN),
}
#: the share of each model in the requests
MIX = {LLAMA: 0.5, QWEN: 0.3, MISTRAL: 0.2}
#: the control: llama3.2 installed and loaded everywhere, every request for it (no
#: routing choice, no cold load: what the admission alone costs against round-robin)
ONE_MODEL = dict.fromkeys(BACKENDS, ((LLAMA,), LLAMA))
SCENARIOS: dict[str, tuple[Mapping[str, tuple[tuple[str, ...], str]], Mapping[str, float]]] = {
    "mixed": (BACKENDS, MIX),
    "one_model": (ONE_MODEL, {LLAMA: 1.0}),
}
SLOTS = 4
#: how often the loaded models are sampled during the window (``/api/ps``)
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The scenario's knobs (defaults: ``task bench``'s)."""

    seconds: float = 15.0  # the measured window per side
    warmup: float = 3.0  # load before the window opens
    clients: int = 18  # closed-loop clients: 1.5 x the 12 slots
    chunks: int = 20
    tokens_per_second: float = 50.0  # 20 tokens: 0.4 s a request
    load_seconds: float = 0.4  # a cold load: one request's service time
    max_queue: int = 4  # per backend: 4 running + 4 waiting, then 503
    queue_timeout: float = 30.0  # the gateway's NZ_QUEUE_TIMEOUT_SECONDS
    backoff: float = 0.1  # a client's pause after a refusal
    light: int = 40  # light-tenant requests in the fairness run
    service_ms: float = 50.0  # its slot hold per request

    @property
    def service_seconds(self) -> float:
        """One request's generation time on a simulated GPU."""
        return self.chunks / self.tokens_per_second


def _sim_args(config: FleetConfig, models: tuple[str, ...], loaded: str) -> list[str]:
    return [
        "--models", ",".join(models), "--loaded", loaded, "--slots", str(SLOTS),
        "--max-loaded", "1", "--max-queue", str(config.max_queue),
        "--tokens-per-second", f"{config.tokens_per_second:g}",
        "--load-seconds", f"{config.load_seconds:g}", "--chunks", str(config.chunks),
    ]  # fmt: skip


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _sim_stats(session: aiohttp.ClientSession, urls: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name, url in urls.items():
        async with session.get(url + "/_sim/stats") as answer:
            out[name] = await answer.json()
    return out


async def _sample_loaded(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    every: float,
    into: dict[str, list[tuple[float, str]]],
    stop: asyncio.Event,
) -> None:
    """Which model each simulator has loaded (``/api/ps``), every ``every`` seconds."""
    while not stop.is_set():
        at = time.monotonic()
        for name, url in urls.items():
            async with session.get(url + "/api/ps") as answer:
                models = [m["name"] for m in (await answer.json())["models"]]
            into.setdefault(name, []).append((at, ",".join(sorted(models)) or "-"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def _residency(samples: Mapping[str, list[tuple[float, str]]]) -> dict[str, Any]:
    """Per backend: how often the loaded model changed, and the share of time each held it
    (``-``: none ready, i.e. loading)."""
    out: dict[str, Any] = {}
    for name, points in samples.items():
        share: Counter[str] = Counter()
        switches = 0
        last = None
        for (at, models), (nxt, _) in itertools.pairwise(points):
            share[models] += nxt - at
        for _, models in points:
            if models != "-" and last is not None and models != last:
                switches += 1
            if models != "-":
                last = models
        total = sum(share.values()) or 1.0
        out[name] = {
            "switches": switches,
            "share": {m: round(t / total, 2) for m, t in share.most_common()},
        }
    return out


async def _configure(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    backends: Mapping[str, tuple[tuple[str, ...], str]],
) -> None:
    """Back to the start (nothing counted), then the scenario's models installed and loaded."""
    for name, url in urls.items():
        async with session.post(url + "/_sim/reset") as answer:
            answer.raise_for_status()
        models, loaded = backends[name]
        body = {"models": list(models), "loaded": [loaded]}
        async with session.post(url + "/_sim/config", json=body) as answer:
            answer.raise_for_status()


async def _ready(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], mix: Mapping[str, float]
) -> str:
    """Every model answers through ``url`` (the gateway's discovery has seen the fleet)."""
    deadline = time.monotonic() + 30
    problem = ""
    while time.monotonic() < deadline:
        statuses = []
        for model in mix:
            async with session.post(url + "/api/chat", json=_chat(model), headers=headers) as a:
                await a.read()
                statuses.append(a.status)
        if statuses == [200] * len(mix):
            return ""
        problem = f"statuses {statuses}"
        await asyncio.sleep(0.5)
    return problem


async def _drive(
    url: str,
    headers: Mapping[str, str],
    sims: Mapping[str, str],
    config: FleetConfig,
    mix: Mapping[str, float],
    seed: int,
) -> dict[str, Any]:
    """Closed-loop clients on ``url``; the simulators' counters over the window."""
    models, weights = list(mix), list(mix.values())
    window: list[float] = []  # [start, end] once known
    done: list[tuple[float, int, float]] = []  # (finished at, status, seconds)
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=config.queue_timeout + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(rng: random.Random) -> None:
            model = rng.choices(models, weights)[0]
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with session.post(
                        url + "/api/chat", json=_chat(model), headers=headers
                    ) as answer:
                        async for _ in answer.content.iter_any():
                            pass
                        status = answer.status
                except (TimeoutError, aiohttp.ClientError):
                    status = -1
                finished = time.monotonic()
                done.append((finished, status, finished - started))
                if status == 200:
                    model = rng.choices(models, weights)[0]
                else:  # the same request again, after a pause (as a client retries)
                    await asyncio.sleep(config.backoff)

        workers = [
            asyncio.ensure_future(client(random.Random(seed * 1000 + i)))
            for i in range(config.clients)
        ]
        samples: dict[str, list[tuple[float, str]]] = {}
        sampling = asyncio.Event()
        sampler: asyncio.Future[None] | None = None
        try:
            await asyncio.sleep(config.warmup)
            before = await _sim_stats(session, sims)
            window.append(time.monotonic())
            sampler = asyncio.ensure_future(
                _sample_loaded(session, sims, SAMPLE_SECONDS, samples, sampling)
            )
            await asyncio.sleep(config.seconds)
            after = await _sim_stats(session, sims)
            window.append(time.monotonic())
        finally:
            sampling.set()
            if sampler is not None:
                await asyncio.gather(sampler, return_exceptions=True)
            stop.set()
            _, pending = await asyncio.wait(workers, timeout=config.queue_timeout + 5)
            for worker in pending:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    start, end = window
    inside = [(status, took) for at, status, took in done if start <= at <= end]
    elapsed = end - start

    def delta(field: str) -> dict[str, float]:
        return {name: after[name][field] - before[name][field] for name in sims}

    busy = delta("busy_slot_seconds")
    ok = [took for status, took in inside if status == 200]
    return {
        "window_seconds": elapsed,
        "utilisation": sum(busy.values()) / (len(sims) * SLOTS * elapsed),
        "utilisation_by_backend": {n: b / (SLOTS * elapsed) for n, b in busy.items()},
        "busy_slot_seconds": busy,
        "backend_503": delta("busy"),
        "backend_503_total": sum(delta("busy").values()),
        "cold_loads": delta("loads"),
        "eviction_waits": delta("eviction_waits"),
        "residency": _residency(samples),
        "completed_by_backend": delta("completed"),
        "client_statuses": {str(k): v for k, v in sorted(Counter(s for s, _ in inside).items())},
        "completed_per_second": len(ok) / elapsed,
        "latency_p50_s": statistics.median(ok) if ok else None,
        "latency_p99_s": percentile(ok, 99) if ok else None,
    }


def _round_robin(stack: BenchStack, name: str, sims: Mapping[str, str], backends: Any) -> str:
    pools = [f"--backend={sims[n]}={','.join(m)}" for n, (m, _) in backends.items()]
    argv = [stack.python, "-m", "tests.bench.round_robin", *pools]
    url = stack._serve(name, argv, stack._base_env(), "/api/version")
    stack.urls[name] = url
    return url


def measure(
    config: FleetConfig, *, state_dir: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Start the fleet, run both sides of each scenario and the fairness figure."""
    stack = BenchStack(state_dir, say=say)
    result: dict[str, Any] = {
        "config": {**asdict(config), "service_seconds": config.service_seconds},
        "slots": SLOTS,
        "scenarios": {
            name: {
                "backends": {n: {"models": list(m), "loaded": x} for n, (m, x) in b.items()},
                "mix": dict(mix),
                "sides": {},
            }
            for name, (b, mix) in SCENARIOS.items()
        },
        "unavailable": {},
    }
    try:
        say("fleet: three simulated GPUs, the gateway on them, the round-robin baseline")
        sims = {
            name: stack.start_gpu_simulator(name, _sim_args(config, models, loaded))
            for name, (models, loaded) in BACKENDS.items()
        }
        stack.start_gateway(
            backends=[BackendSpec.checked(n, u, SLOTS) for n, u in sims.items()],
            env={"NZ_QUEUE_TIMEOUT_SECONDS": f"{config.queue_timeout:g}"},
        )
        gateway = (stack.urls.get("gateway"), {"authorization": f"Bearer {stack.key}"})
        baselines = {
            name: _round_robin(stack, f"round_robin_{name}", sims, backends)
            for name, (backends, _) in SCENARIOS.items()
        }
        result["unavailable"].update(stack.unavailable)

        async def run_sides() -> None:
            async with aiohttp.ClientSession() as session:
                for scenario, (backends, mix) in SCENARIOS.items():
                    sides = {"gateway": gateway, "round_robin": (baselines[scenario], {})}
                    for side, (url, headers) in sides.items():
                        if url is None:
                            continue
                        await _configure(session, sims, backends)
                        # the gateway's view of the models (/api/tags, /api/ps every 3 s)
                        await asyncio.sleep(4.0)
                        problem = await _ready(session, url, headers, mix)
                        if problem:
                            result["unavailable"][f"{scenario}/{side}"] = f"not ready: {problem}"
                            continue
                        await _configure(session, sims, backends)  # the probes' loads undone
                        say(f"  fleet {scenario}: {side}, {config.clients} clients")
                        load = os.getloadavg()
                        got = await _drive(url, headers, sims, config, mix, seed=1)
                        got["loadavg"] = load
                        result["scenarios"][scenario]["sides"][side] = got
                        say(
                            f"  fleet {scenario} {side}: utilisation {got['utilisation']:.2f}, "
                            f"{got['completed_per_second']:.1f} req/s, backend 503s "
                            f"{got['backend_503_total']}, clients {got['client_statuses']}, "
                            f"cold loads {sum(got['cold_loads'].values())} "
                            f"({sum(got['eviction_waits'].values())} waited for a busy model), "
                            f"model switches {_switches(got)}, load {load[0]:.1f}"
                        )

        asyncio.run(run_sides())
        if "redis" in stack.urls:
            say("  fleet: light tenant behind a heavy one (fair queue vs FIFO)")
            result["fairness"] = asyncio.run(
                bench_fair_queue.run(config.light, config.service_ms, url=stack.urls["redis"])
            )
    finally:
        stack.stop()
    return result


def _switches(side: Mapping[str, Any]) -> str:
    return " / ".join(str(r["switches"]) for r in side.get("residency", {}).values())


def figures(result: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The three targets' figures, from the mixed scenario (None where not measured)."""
    sides = ((result or {}).get("scenarios") or {}).get("mixed", {}).get("sides", {})
    gateway, rr = sides.get("gateway"), sides.get("round_robin")
    fair = (result or {}).get("fairness") or {}
    rows = {row["queue"]: row for row in fair.get("rows", [])}
    return {
        "light_p99_fair": rows.get("fair (ours)", {}).get("p99"),
        "light_p99_fifo": rows.get("FIFO (arrival order)", {}).get("p99"),
        "backend_503_gateway": gateway["backend_503_total"] if gateway else None,
        "backend_503_round_robin": rr["backend_503_total"] if rr else None,
        "utilisation_gateway": gateway["utilisation"] if gateway else None,
        "utilisation_round_robin": rr["utilisation"] if rr else None,
        "utilisation_ratio": (
            gateway["utilisation"] / rr["utilisation"]
            if gateway and rr and rr["utilisation"]
            else None
        ),
    }


def _f(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _describe(backends: Mapping[str, Any], mix: Mapping[str, float]) -> str:
    models = "; ".join(
        f"`{n}` {', '.join(b['models'])} ({b['loaded']} loaded)" for n, b in backends.items()
    )
    return models + ". Mix: " + ", ".join(f"{m} {share:.0%}" for m, share in mix.items())


def markdown_lines(result: Mapping[str, Any] | None) -> list[str]:
    """The fleet section of the report."""
    lines = ["", "## Fleet: three simulated GPUs", ""]
    if not result:
        return [*lines, "Not measured in this run.", ""]
    c = result["config"]
    scenarios = result.get("scenarios", {})
    lines += [
        f"Three simulated backends of {result['slots']} slots each (one model loaded at a time, "
        f"`--max-loaded 1`), {c['tokens_per_second']:g} tokens/s ({c['chunks']} tokens: "
        f"{c['service_seconds']:.2f} s a request), a cold load of {c['load_seconds']:g} s, "
        f"`--max-queue {c['max_queue']}` (then Ollama's 503). {c['clients']} closed-loop "
        "clients (1.5 x the slots; a refused request is asked again, same model, after "
        f"{c['backoff']:g} s) on streaming `/api/chat`, {c['warmup']:g} s warm-up, then a "
        f"{c['seconds']:g} s window; the simulators reset between runs. Utilisation = "
        "busy slot-seconds ÷ available slot-seconds, both from the simulators' `/_sim/stats` "
        "(not from the gateway); backend 503s and cold loads likewise (in brackets: the "
        "requests that found the loaded model busy and waited for its requests to finish "
        "before theirs could load); model switches: how often the model in each backend's "
        f"`/api/ps` changed, sampled every {SAMPLE_SECONDS:g} s. The gateway's queue "
        f"timeout is {c['queue_timeout']:g} s. The round-robin baseline "
        "(`tests/bench/round_robin.py`) is a plain passthrough taking the backends that have "
        "the model in turn (no slots, no queue, no view of what is loaded).",
        "",
    ]
    titles = {
        "mixed": "Mixed models (the figures the targets use)",
        "one_model": "Control: one model everywhere (no routing choice, no cold load: what "
        "admission alone costs)",
    }
    lines += [
        "| scenario | path | utilisation | per backend | completed req/s | backend 503s "
        "| client answers | cold loads (waited for a busy model) | model switches per backend "
        "| latency p50 / p99 (s) | load avg |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, scenario in scenarios.items():
        for side, label in (("gateway", "full gateway"), ("round_robin", "round-robin")):
            s = scenario["sides"].get(side)
            if s is None:
                lines.append(f"| {name} | {label} | not measured | | | | | | | | |")
                continue
            per = " / ".join(f"{v:.2f}" for v in s["utilisation_by_backend"].values())
            answers = ", ".join(f"{k}: {v}" for k, v in s["client_statuses"].items())
            lines.append(
                f"| {name} | {label} | {s['utilisation']:.2f} | {per} | "
                f"{s['completed_per_second']:.1f} | {s['backend_503_total']} | {answers} | "
                f"{sum(s['cold_loads'].values())} ({sum(s.get('eviction_waits', {}).values())}) | "
                f"{_switches(s) or 'n/a'} | {_f(s['latency_p50_s'])} / "
                f"{_f(s['latency_p99_s'])} | {s['loadavg'][0]:.2f} |"
            )
    lines.append("")
    for name, scenario in scenarios.items():
        lines.append(
            f"- `{name}`: {titles.get(name, name)}. "
            + _describe(scenario["backends"], scenario["mix"])
            + "."
        )
    for name, reason in (result.get("unavailable") or {}).items():
        lines.append(f"- **{name}** not measured: {str(reason).splitlines()[0][:300]}")
    fairness = result.get("fairness")
    if fairness:
        title, _, body = bench_fair_queue.render(fairness).strip().partition("\n")
        lines += [
            "",
            "### " + title.removeprefix("## ") + " (`bench_fair_queue.py`: the real "
            "`SlotAdmission` on the run's Redis, not through HTTP)",
            body,
            "",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = FleetConfig()
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="window per side")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="closed-loop clients")
    parser.add_argument(
        "--load-seconds", type=float, default=defaults.load_seconds, help="a cold load"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs")
    args = parser.parse_args()
    config = FleetConfig(seconds=args.seconds, clients=args.clients, load_seconds=args.load_seconds)
    result = measure(config, state_dir=REPO_ROOT / ".bench" / "fleet")
    result["figures"] = figures(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(["# Fleet benchmark", *markdown_lines(result)])
    (args.out / "benchmarks-fleet.md").write_text(text)
    print(text)
    print(json.dumps(result["figures"], indent=2))


if __name__ == "__main__":
    main()
