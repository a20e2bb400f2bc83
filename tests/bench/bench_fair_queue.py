"""How long a light tenant waits behind a heavy one for a backend slot (``task bench:fairness``).

Run: ``.venv/bin/python -m tests.bench.bench_fair_queue [--light 40] [--service-ms 50]``

The scenario of issue 12: one backend of 4 slots; a heavy tenant keeps 32
requests in flight (each holds its slot for ``--service-ms``, then asks
again at once); a light tenant sends one request at a time. Both go through
the real :class:`~neuronetz_gateway.adapters.redis_slots.SlotAdmission` and
the local Redis (``NZ_REDIS_URL`` or 127.0.0.1:6379, its own key prefix),
the heavy tenant from one "replica" (client), the light one from another.
Measured: the light tenant's queue wait, as a multiple of one request's
service time (p50, p99, max), with fair queuing and with arrival order
(FIFO, ``fair=False``) in the same run; the ratio FIFO / fair is the figure.
Writes ``docs/benchmarks-fairness.{md,json}``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
from pathlib import Path
from typing import Any

from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_slots import SlotAdmission

SLOTS = 4
HEAVY_IN_FLIGHT = 32
DOCS = Path(__file__).resolve().parents[2] / "docs"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def light_waits(url: str, *, fair: bool, light: int, service: float) -> list[float]:
    """The light tenant's waits (seconds) while the heavy tenant keeps 32 in flight."""
    prefix = f"nzbench{secrets.token_hex(3)}"
    heavy_client = await open_redis(url, timeout_seconds=5.0)
    light_client = await open_redis(url, timeout_seconds=5.0)
    heavy_slots = SlotAdmission(heavy_client, prefix=prefix, fair=fair, timeout_seconds=5.0)
    light_slots = SlotAdmission(light_client, prefix=prefix, fair=fair, timeout_seconds=5.0)
    backend = "gpu"
    stop = asyncio.Event()
    queued = 0
    backlog = asyncio.Event()

    def on_queued(_: int) -> None:
        nonlocal queued
        queued += 1
        if queued >= HEAVY_IN_FLIGHT - SLOTS:
            backlog.set()

    async def heavy() -> None:
        while not stop.is_set():
            lease = await heavy_slots.acquire(
                backend, capacity=SLOTS, tenant="heavy", queue_timeout=300, on_queued=on_queued
            )
            await asyncio.sleep(service)
            await heavy_slots.release(lease, capacity=SLOTS)

    workers = [asyncio.ensure_future(heavy()) for _ in range(HEAVY_IN_FLIGHT)]
    waits: list[float] = []
    try:
        await backlog.wait()
        for _ in range(light):
            lease = await light_slots.acquire(
                backend, capacity=SLOTS, tenant="light", queue_timeout=300
            )
            waits.append(lease.waited)
            await asyncio.sleep(service)
            await light_slots.release(lease, capacity=SLOTS)
    finally:
        stop.set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for slots in (heavy_slots, light_slots):
            await slots.aclose()
        for client in (heavy_client, light_client):
            await close_redis(client)
    return waits


def _row(name: str, waits: list[float], service: float) -> dict[str, Any]:
    return {
        "queue": name,
        "requests": len(waits),
        "p50": statistics.median(waits) / service,
        "p99": _quantile(waits, 0.99) / service,
        "max": max(waits) / service,
    }


async def run(light: int, service_ms: float, url: str | None = None) -> dict[str, Any]:
    """Fair then FIFO on ``url`` (default ``NZ_REDIS_URL`` or the local Redis)."""
    url = url or os.environ.get("NZ_REDIS_URL", "redis://127.0.0.1:6379/0")
    service = service_ms / 1000
    fair = await light_waits(url, fair=True, light=light, service=service)
    fifo = await light_waits(url, fair=False, light=max(light // 4, 5), service=service)
    rows = [_row("fair (ours)", fair, service), _row("FIFO (arrival order)", fifo, service)]
    return {
        "slots": SLOTS,
        "heavy_in_flight": HEAVY_IN_FLIGHT,
        "service_ms": service_ms,
        "rows": rows,
        "p99_ratio_fifo_over_fair": rows[1]["p99"] / rows[0]["p99"],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "## Fair slot admission: a light tenant behind a heavy one",
        "",
        f"One backend of {result['slots']} slots, a heavy tenant keeping "
        f"{result['heavy_in_flight']} requests in flight, a light tenant sending one at a time; "
        f"each request holds its slot {result['service_ms']:g} ms. The light tenant's queue "
        "wait in multiples of that service time (target: p99 within 1.5):",
        "",
        "| queue | light requests | p50 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['queue']} | {row['requests']} | {row['p50']:.2f} | {row['p99']:.2f} "
            f"| {row['max']:.2f} |"
        )
    lines += ["", f"FIFO p99 / fair p99: {result['p99_ratio_fifo_over_fair']:.1f}x", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light", type=int, default=40, help="light requests (fair run)")
    parser.add_argument("--service-ms", type=float, default=50.0, help="slot hold per request")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    result = asyncio.run(run(args.light, args.service_ms))
    text = render(result)
    print(text)
    if not args.no_write:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "benchmarks-fairness.md").write_text(text)
        (DOCS / "benchmarks-fairness.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
