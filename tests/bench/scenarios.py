"""The measurements: each returns plain dicts that go straight into ``benchmarks.json``.

- :meth:`Scenarios.matrix`: every chat variant x {small chat, 20-chunk stream}
  x concurrency {1, 32}, alternated in rounds (the variant order rotates each
  round so none always runs first);
- :meth:`Scenarios.authorize`: ``GET /authorize`` (a cached key) against the
  trivial handler, alternated in rounds;
- :meth:`Scenarios.fidelity`: with a chunk every 20 ms, per-chunk arrival
  times at concurrency 1, requests interleaved across variants;
- :meth:`Scenarios.flood`: valid streaming traffic through the gateway with
  no flood, a same-prefix wrong-key flood and a random-prefix one, in rounds;
  Argon2 verifications read from the auth service's ``/metrics``.

CPU per request: the services' ``utime + stime`` before and after a cell,
divided by the requests wrk completed (see :mod:`tests.bench.procs`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import httpx
import redis

from neuronetz_gateway.domain.keys import generate_key
from tests.bench.loadgen import HttpTarget, LoadgenError, WrkResult, WrkRun, time_stream
from tests.bench.procs import (
    RssSampler,
    ServiceProcess,
    machine_cpu,
    services_cpu,
    services_main_thread_cpu,
)
from tests.bench.stats import percentile
from tests.bench.variants import Variant, authorize_headers, chat_body

__all__ = ["WORKLOADS", "BenchConfig", "Scenarios"]

#: (workload id, streaming?)
WORKLOADS: tuple[tuple[str, bool], ...] = (("chat", False), ("stream", True))
FLOOD_CONDITIONS = ("none", "same_prefix", "random_prefix")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """How long and how hard; the defaults keep ``task bench`` under 12 minutes."""

    seconds: float = 2.5
    rounds: int = 3
    concurrencies: tuple[int, ...] = (1, 32)
    chunks: int = 20
    fidelity_delay_ms: float = 20.0
    fidelity_requests: int = 12
    flood_connections: int = 8
    flood_delay_ms: int = 16  # per connection: <= 8 / 16 ms = 500 wrong keys/s
    pause: float = 0.2  # between cells: let sockets close and CPUs settle


def _rotated(items: Sequence[Any], shift: int) -> list[Any]:
    shift %= max(1, len(items))
    return [*items[shift:], *items[:shift]]


class Scenarios:
    """Runs the measurements against a started stack."""

    def __init__(
        self,
        *,
        wrk: str,
        urls: Mapping[str, str],
        services: Mapping[str, ServiceProcess],
        gateway_key: str,
        gateway_prefix: str,
        config: BenchConfig,
        say: Callable[[str], None],
    ) -> None:
        self.wrk = wrk
        self.urls = urls
        self.services = services
        self.key = gateway_key
        self.prefix = gateway_prefix
        self.config = config
        self.say = say
        #: Peak RSS per service over every concurrency-32 cell.
        self.peak_rss: dict[str, int] = {}

    # ------------------------------------------------------------------ one cell

    def redis_calls(self) -> dict[str, int]:
        """Commands Redis has run so far, by name (``INFO commandstats``); {} without Redis."""
        url = self.urls.get("redis")
        if not url:
            return {}
        client = redis.Redis.from_url(url)
        try:
            stats = client.info("commandstats")
        except redis.RedisError:
            return {}
        finally:
            client.close()
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if isinstance(value, dict) and name != "cmdstat_info"
        }

    def _cpu(self, names: Sequence[str]) -> dict[str, float]:
        return services_cpu({n: self.services[n] for n in names if n in self.services})

    def cell(
        self,
        target: HttpTarget,
        *,
        connections: int,
        charged: Sequence[str],
        seconds: float | None = None,
        labels: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Run wrk once on ``target``; the result with CPU per request per service."""
        seconds = seconds or self.config.seconds
        names = [*charged, "simulator"]
        sampler = RssSampler({n: self.services[n] for n in names if n in self.services})
        everything = list(self.services)
        redis_before = self.redis_calls() if "redis" in charged else {}
        charged_services = {n: self.services[n] for n in charged if n in self.services}
        main_before = services_main_thread_cpu(charged_services)
        machine_before, cpu_before = machine_cpu(), self._cpu(everything)
        record: dict[str, Any] = {**labels, "concurrency": connections}
        try:
            if connections > 1:
                with sampler:
                    result = self._wrk(target, connections, seconds)
                for name, peak in sampler.peaks.items():
                    self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)
            else:
                result = self._wrk(target, connections, seconds)
        except LoadgenError as exc:
            record["error"] = str(exc)
            return record
        cpu_after, machine_after = self._cpu(everything), machine_cpu()
        main_after = services_main_thread_cpu(charged_services)
        record.update(_result_fields(result))
        record["machine_busy"] = machine_after.utilisation_since(machine_before)
        # Whatever else ran meanwhile (other users of a shared machine), in cores:
        # all busy time minus every process of ours and wrk.
        ours = sum(cpu_after[n] - cpu_before[n] for n in cpu_after) + result.loadgen_cpu_seconds
        busy = machine_after.busy_seconds_since(machine_before)
        record["other_load_cores"] = max(0.0, busy - ours) / result.seconds if result.seconds else 0
        per_request = {
            n: 1000 * (cpu_after[n] - cpu_before[n]) / result.requests if result.requests else None
            for n in names
            if n in cpu_after
        }
        record["cpu_ms_per_request"] = per_request
        # the main threads alone (a Granian worker's Python; its Rust threads run beside it)
        record["main_thread_cpu_ms_per_request"] = {
            n: 1000 * (main_after[n] - main_before[n]) / result.requests
            if result.requests
            else None
            for n in main_after
        }
        if redis_before and result.requests:
            after = self.redis_calls()
            record["redis_calls_per_request"] = {
                name: (calls - redis_before.get(name, 0)) / result.requests
                for name, calls in sorted(after.items())
                if calls > redis_before.get(name, 0)
            }
        charged_ms = [v for n in charged if (v := per_request.get(n)) is not None]
        record["server_cpu_ms_per_request"] = sum(charged_ms)
        if result.requests == 0:
            record["error"] = "no request completed within the cell"
        elif result.failed > result.requests // 100:
            record["error"] = (
                f"{result.failed} of {result.requests} requests failed "
                f"(non-2xx {result.non_2xx}, socket errors {result.socket_errors})"
            )
        time.sleep(self.config.pause)
        return record

    def _wrk(self, target: HttpTarget, connections: int, seconds: float) -> WrkResult:
        return WrkRun(self.wrk, target, connections=connections, seconds=seconds).wait()

    # ------------------------------------------------------------------ the phases

    def warm_up(self, variants: Sequence[Variant]) -> None:
        """One short run per variant and workload: connection pools, caches, discovery."""
        for variant in variants:
            for workload, stream in WORKLOADS:
                if not any(variant.measures(workload, c) for c in self.config.concurrencies):
                    continue
                target = variant.target(self.urls, self.key, stream=stream)
                self.cell(target, connections=8, charged=(), seconds=1, labels={})

    def matrix(self, variants: Sequence[Variant]) -> list[dict[str, Any]]:
        """Every variant x workload x concurrency, ``rounds`` times, variants alternating."""
        cells = []
        for round_no in range(self.config.rounds):
            for workload, stream in WORKLOADS:
                for connections in self.config.concurrencies:
                    for variant in _rotated(variants, round_no):
                        if not variant.measures(workload, connections):
                            continue
                        target = variant.target(self.urls, self.key, stream=stream)
                        long = variant.long_cells if connections > 1 else 1.0
                        cell = self.cell(
                            target,
                            connections=connections,
                            charged=variant.services,
                            seconds=self.config.seconds * long,
                            labels={
                                "variant": variant.id,
                                "workload": workload,
                                "round": round_no,
                                "path": variant.path,
                            },
                        )
                        cells.append(cell)
                        self.say(_describe(cell))
        return cells

    def authorize(self, *, include_trivial: bool) -> list[dict[str, Any]]:
        """``GET /authorize`` on the auth service (a cached, valid key) vs the trivial handler."""
        sides = [("authorize", "auth")]
        if include_trivial:
            sides.append(("trivial", "trivial"))
        return self.authorize_sides(sides, self.config.concurrencies)

    def authorize_sides(
        self,
        sides: Sequence[tuple[str, str]],
        concurrencies: Sequence[int],
        seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /authorize`` on each (variant label, service) side, alternated in rounds.

        The service's name is its URL key and the process charged for CPU. ``seconds``
        per cell (default: 0.75 x the configured cell, at least 2 s).
        """
        seconds = seconds or max(2.0, self.config.seconds * 0.75)
        cells = []
        host = self.urls.get("gateway", "127.0.0.1").removeprefix("http://")
        headers = authorize_headers(self.key, host)
        sides = [side for side in sides if side[1] in self.urls]
        for _, service in sides:  # warm: caches, connections, the script loaded
            target = HttpTarget(self.urls[service] + "/authorize", "GET", headers)
            self.cell(target, connections=8, charged=(), seconds=1, labels={})
        for round_no in range(self.config.rounds):
            for connections in concurrencies:
                for variant, service in _rotated(sides, round_no):
                    target = HttpTarget(self.urls[service] + "/authorize", "GET", headers)
                    cell = self.cell(
                        target,
                        connections=connections,
                        charged=(service,),
                        seconds=seconds,
                        labels={"variant": variant, "workload": "authorize", "round": round_no},
                    )
                    cells.append(cell)
                    self.say(_describe(cell))
        return cells

    def flood(self) -> list[dict[str, Any]]:
        """Valid streams (c=32) through the gateway, with and without a wrong-key flood."""
        cells = []
        valid = _gateway_stream_target(self.urls["gateway"], self.key)
        charged = ("caddy_gateway", "auth", "proxy", "redis", "postgres")
        for round_no in range(self.config.rounds):
            for condition in _rotated(FLOOD_CONDITIONS, round_no):
                before = self._auth_counters()
                flood_run = self._start_flood(condition)
                cell = self.cell(
                    valid,
                    connections=32,
                    charged=charged,
                    labels={"variant": "gateway_native", "workload": "flood", "round": round_no},
                )
                cell["condition"] = condition
                if flood_run is not None:
                    try:
                        flood = flood_run.wait()
                        cell["flood"] = _result_fields(flood)
                        cell["flood"]["refused"] = flood.non_2xx
                        cell["flood"]["admitted"] = flood.requests - flood.failed
                    except LoadgenError as exc:
                        cell["flood"] = {"error": str(exc)}
                after = self._auth_counters()
                cell["auth_counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                cells.append(cell)
                self.say(_describe(cell) + f" flood={condition}")
                time.sleep(self.config.pause)
        return cells

    def _start_flood(self, condition: str) -> WrkRun | None:
        if condition == "none":
            return None
        cfg = self.config
        # Fresh keys every round: the negative cache must not make later rounds easy.
        count = int(cfg.flood_connections * 1000 / max(1, cfg.flood_delay_ms) * (cfg.seconds + 2))
        prefix = self.prefix if condition == "same_prefix" else None
        values = [f"Bearer {generate_key(prefix).full}" for _ in range(count)]
        target = HttpTarget(
            self.urls["gateway"] + "/api/chat",
            "POST",
            {"Content-Type": "application/json"},
            chat_body("native", stream=True),
        )
        run = WrkRun(
            self.wrk,
            target,
            connections=cfg.flood_connections,
            seconds=cfg.seconds + 1,
            rotate=("Authorization", values),
            delay_ms=cfg.flood_delay_ms,
        )
        time.sleep(0.5)  # the flood is under way before the valid traffic starts
        return run

    def _auth_counters(self) -> dict[str, float]:
        """Auth's Prometheus counters of interest, summed over their labels."""
        try:
            text = httpx.get(self.urls["auth"] + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith("nz_auth_"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            if "result=" in name_labels and name == "nz_auth_key_cache_total":
                result = name_labels.split('result="', 1)[1].split('"', 1)[0]
                name = f"{name}:{result}"
            if name.endswith("_total") or ":" in name:
                try:
                    totals[name] = totals.get(name, 0.0) + float(value)
                except ValueError:
                    continue
        return totals

    async def fidelity(self, variants: Sequence[Variant]) -> dict[str, Any]:
        """Chunk arrival times at concurrency 1, with ``fidelity_delay_ms`` between chunks."""
        cfg = self.config
        sim = self.urls["simulator"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await _sim_config(session, sim, {"chunk_delay_ms": cfg.fidelity_delay_ms})
            try:
                targets = {v.id: v.target(self.urls, self.key, stream=True) for v in variants}
                samples: dict[str, dict[str, list[float]]] = {
                    v: {"first_chunk": [], "gaps": []} for v in targets
                }
                # Request i belongs to round i % rounds: per-round p99s show the spread.
                rounds: dict[str, list[list[float]]] = {
                    v: [[] for _ in range(cfg.rounds)] for v in targets
                }
                errors: dict[str, str] = {}
                for target in targets.values():  # warm: connection set up, caches filled
                    await time_stream(session, target, chunks=cfg.chunks)
                for i in range(cfg.fidelity_requests):
                    for vid, target in _rotated(list(targets.items()), i):
                        timing = await time_stream(session, target, chunks=cfg.chunks)
                        if timing.status != 200 or timing.chunks < cfg.chunks:
                            errors[vid] = f"HTTP {timing.status}, {timing.chunks} chunks"
                            continue
                        samples[vid]["first_chunk"].append(timing.first_chunk * 1000)
                        gaps = [g * 1000 for g in timing.gaps]
                        samples[vid]["gaps"].extend(gaps)
                        rounds[vid][i % cfg.rounds].extend(gaps)
            finally:
                await _sim_config(session, sim, {"chunk_delay_ms": 0})
        summary: dict[str, Any] = {}
        for vid, sample in samples.items():
            summary[vid] = {
                "requests": len(sample["first_chunk"]),
                "first_chunk_ms": {
                    "p50": percentile(sample["first_chunk"], 50),
                    "p99": percentile(sample["first_chunk"], 99),
                },
                "gap_ms": {
                    "p50": percentile(sample["gaps"], 50),
                    "p99": percentile(sample["gaps"], 99),
                    "max": max(sample["gaps"], default=math.nan),
                    "n": len(sample["gaps"]),
                    "p99_by_round": [percentile(r, 99) for r in rounds[vid]],
                },
                "error": errors.get(vid),
            }
        return {"chunk_delay_ms": cfg.fidelity_delay_ms, "chunks": cfg.chunks, "variants": summary}


async def _sim_config(session: aiohttp.ClientSession, url: str, update: dict[str, Any]) -> None:
    async with session.post(url + "/_sim/config", json=update) as response:
        response.raise_for_status()


def _gateway_stream_target(url: str, key: str) -> HttpTarget:
    return HttpTarget(
        url + "/api/chat",
        "POST",
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        chat_body("native", stream=True),
    )


def _result_fields(result: WrkResult) -> dict[str, Any]:
    fields = asdict(result)
    fields["failed"] = result.failed
    fields["loadgen_cpu_share"] = (
        result.loadgen_cpu_seconds / result.seconds if result.seconds else 0
    )
    return fields


def _describe(cell: Mapping[str, Any]) -> str:
    if "rps" not in cell:
        where = f"{cell.get('variant')} {cell.get('workload')} c={cell['concurrency']}"
        return f"  {where}: {cell.get('error')}"
    flag = f"  !! {cell['error']}" if cell.get("error") else ""
    return (
        f"  r{cell['round']} {cell['variant']:<15} {cell['workload']:<9} c={cell['concurrency']:<3}"
        f" {cell['rps']:>8.0f} req/s  p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms"
        f"  cpu {cell.get('server_cpu_ms_per_request', 0):.3f} ms/req"
        f"  busy {cell.get('machine_busy', 0):.0%}"
        f"  other {cell.get('other_load_cores', 0):.2f} cores{flag}"
    )


def run_fidelity(scenarios: Scenarios, variants: Sequence[Variant]) -> dict[str, Any]:
    """:meth:`Scenarios.fidelity` from synchronous code."""
    return asyncio.run(scenarios.fidelity([v for v in variants if v.fidelity]))


__all__ += ["FLOOD_CONDITIONS", "run_fidelity"]
