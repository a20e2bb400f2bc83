"""What each hot-path cut saves per call, in-process (µs; best of several repeats).

A loaded machine makes service-level A/B ratios noisy at the 1-3 % these cuts
are worth; a per-call timing in one process is not (the best of the repeats
is the least disturbed). Compared, each the old way against the new:

- the proxy's request line: structlog's chain against :func:`info_line`
  (the direct writer, stderr on ``/dev/null``, in an event loop that yields
  every 32 lines, as a loaded proxy does);
- a labelled child: ``metric.labels(...)`` against the :class:`LabelCache`;
- the tenant budget gauges: three ``Gauge.set`` per decision against one
  dict write (and the collector's cost per scrape, for a hundred tenants);
- the proxy's ``x-ratelimit-*`` headers: the dict of :func:`ratelimit_headers`
  encoded pair by pair against :func:`ratelimit_header_pairs`;
- an HMAC-SHA256 (identity signature, key-cache fingerprint): ``hmac.new``
  against the keyed state of :func:`hmac_sha256`;
- auth's decision bound: ``asyncio.timeout`` against :class:`SharedTimeout`,
  in a loop with other timers pending, as under load;
- an agent-surface stream's reads with keep-alive: ``asyncio.wait`` per read
  (as ``lines_or_silence`` was) against :func:`lines_or_silence`, beyond a
  bare read.

Run: ``python -m tests.bench.bench_hot_path_micro``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sys
import timeit
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from neuronetz_gateway import logging as nz_logging
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.accounting import AuditRow
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.keyed_mac import hmac_sha256
from neuronetz_gateway.domain.limits import LevelUsage, ratelimit_header_pairs, ratelimit_headers
from neuronetz_gateway.proxy.metrics import LabelCache
from neuronetz_gateway.proxy.relay import lines_or_silence
from neuronetz_gateway.shared_timeout import SharedTimeout

__all__ = ["main"]

_ROW = AuditRow(
    request_id="0123456789abcdef0123456789abcdef", ts=datetime.now(UTC), tenant_id=1, key_id=2,
    key_prefix="nz_abcdef12", route="chat", model="llama3.2:latest", status=200,
    prompt_tokens=12, completion_tokens=20, ttfb_ms=3, duration_ms=41, streamed=True,
    client_disconnected=False, estimated=False,
)  # fmt: skip


def _best_us(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _log_lines(n: int) -> tuple[float, float]:
    """µs per proxy request line: structlog's chain, then the direct writer."""
    log = nz_logging.get_logger("bench")

    def chained() -> None:
        log.info(
            "proxy_request", **msgspec.structs.asdict(_ROW), tenant="acme", upstream_error=None
        )

    def direct() -> None:
        fields = msgspec.structs.asdict(_ROW)
        fields["tenant"] = "acme"
        fields["upstream_error"] = None
        nz_logging.info_line(log, "proxy_request", fields)

    async def timed(line: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(7):
            start = timeit.default_timer()
            for i in range(n):
                line()
                if i % 32 == 31:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)
            best = min(best, timeit.default_timer() - start)
        return best / n * 1e6

    async def both() -> tuple[float, float]:
        return await timed(chained), await timed(direct)

    return asyncio.run(both())


def _labels(n: int) -> tuple[float, float]:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ("route", "status"), registry=registry)
    cache = LabelCache()
    old = _best_us(lambda: counter.labels("chat", "200").inc(), n)
    new = _best_us(lambda: cache(counter, "chat", "200").inc(), n)
    bare = _best_us(lambda: counter.labels("chat", "200"), n)
    cached = _best_us(lambda: cache(counter, "chat", "200"), n)
    print(f"  (labels() alone {bare:.2f} µs, cached lookup {cached:.2f} µs)")
    return old, new


def _budgets(n: int) -> tuple[float, float, float]:
    limits = Limits(daily_tokens=10**15, monthly_tokens=10**15, total_tokens=10**15)
    used = LevelUsage(daily=123456, monthly=1234567, total=12345678)
    registry = CollectorRegistry()
    gauge = Gauge("g", "g", ("tenant", "budget"), registry=registry)
    children: dict[tuple[str, str], Gauge] = {}

    def old() -> None:  # the per-decision gauge, as it was (children cached)
        for budget, limit, spent in (
            ("daily", limits.daily_tokens, used.daily),
            ("monthly", limits.monthly_tokens, used.monthly),
            ("total", limits.total_tokens, used.total),
        ):
            if limit is None or spent is None:
                continue
            ratio = max(0, limit - spent) / limit if limit > 0 else 0.0
            child = children.get(("acme", budget))
            if child is None:
                child = children[("acme", budget)] = gauge.labels("acme", budget)
            child.set(ratio)

    metrics = AuthMetrics()
    new = _best_us(lambda: metrics.tenant_budgets("acme", limits, used), n)
    for i in range(100):
        metrics.tenant_budgets(f"t{i}", limits, used)
    scrape = _best_us(metrics.render, max(1, n // 1000))
    return _best_us(old, n), new, scrape


def _headers(n: int) -> tuple[float, float]:
    allowance = Allowance(
        limit_requests=10**6, remaining_requests=10**6 - 1, limit_tokens=10**9,
        remaining_tokens=10**9 - 300, remaining_daily_tokens=10**12,
        remaining_monthly_tokens=10**12, remaining_total_tokens=10**12,
        reset_requests_ms=40, reset_tokens_ms=1500,
    )  # fmt: skip

    def old() -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode()) for k, v in ratelimit_headers(allowance).items()]

    assert old() == ratelimit_header_pairs(allowance)
    return _best_us(old, n), _best_us(lambda: ratelimit_header_pairs(allowance), n)


def _macs(n: int) -> tuple[float, float]:
    secret, signed = b"s" * 48, b"v1." + b"x" * 700  # an identity's size
    assert hmac_sha256(secret, signed).digest() == hmac.new(secret, signed, hashlib.sha256).digest()
    old = _best_us(lambda: hmac.new(secret, signed, hashlib.sha256).digest(), n)
    return old, _best_us(lambda: hmac_sha256(secret, signed).digest(), n)


def _timeouts(n: int, repeat: int = 9) -> tuple[float, float]:
    """µs per bounded block beyond a no-op context manager's, beside 64 pending timers.

    The event loop runs every 32 blocks (as when decisions are in flight); the
    three kinds of block are interleaved, best of ``repeat`` each.
    """
    shared = SharedTimeout(1.5)

    async def once(bound: Callable[[], Any]) -> float:
        start = timeit.default_timer()
        for i in range(n):
            async with bound():
                pass
            if i % 32 == 31:
                await asyncio.sleep(0)
        return (timeit.default_timer() - start) / n * 1e6

    async def all_three() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        others = [loop.call_later(60 + i, lambda: None) for i in range(64)]
        bounds: dict[str, Callable[[], Any]] = {
            "none": _Nothing,
            "asyncio": lambda: asyncio.timeout(1.5),
            "shared": shared,
        }
        best = dict.fromkeys(bounds, float("inf"))
        for _ in range(repeat):
            for name, bound in bounds.items():
                best[name] = min(best[name], await once(bound))
        for handle in others:
            handle.cancel()
        return best["asyncio"] - best["none"], best["shared"] - best["none"]

    return asyncio.run(all_three())


async def _waited_reads(chunks: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes | None]:
    """``lines_or_silence`` as it was: one ``asyncio.wait`` (and its timer) per read."""
    pending = asyncio.ensure_future(anext(chunks))
    try:
        while True:
            done, _ = await asyncio.wait((pending,), timeout=every)
            if not done:
                yield None
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                return
            yield data
            pending = asyncio.ensure_future(anext(chunks))
    finally:
        if not pending.done():
            pending.cancel()


def _keepalive_reads(n: int, repeat: int = 7) -> tuple[float, float]:
    """µs per upstream read beyond a bare read (one loop turn each), 64 timers pending."""

    async def reads() -> AsyncIterator[bytes]:
        for _ in range(n):
            await asyncio.sleep(0)
            yield b"x"

    async def once(wrap: Callable[[AsyncIterator[bytes]], AsyncIterator[Any]]) -> float:
        start = timeit.default_timer()
        async for _ in wrap(reads()):
            pass
        return (timeit.default_timer() - start) / n * 1e6

    async def all_three() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        others = [loop.call_later(60 + i, lambda: None) for i in range(64)]
        wraps: dict[str, Callable[[AsyncIterator[bytes]], AsyncIterator[Any]]] = {
            "bare": lambda chunks: chunks,
            "wait": lambda chunks: _waited_reads(chunks, 10.0),
            "spells": lambda chunks: lines_or_silence(chunks, 10.0),
        }
        best = dict.fromkeys(wraps, float("inf"))
        for _ in range(repeat):
            for name, wrap in wraps.items():
                best[name] = min(best[name], await once(wrap))
        for handle in others:
            handle.cancel()
        return best["wait"] - best["bare"], best["spells"] - best["bare"]

    return asyncio.run(all_three())


class _Nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        return None


def main() -> int:
    """Print the per-call costs, old and new."""
    devnull = open(os.devnull, "w")  # noqa: SIM115 - stderr for the whole run
    sys.stderr = devnull
    nz_logging.configure_logging("info", "json")
    print(f"load average at start: {os.getloadavg()}")
    old, new = _log_lines(20_000)
    print(
        f"proxy request line: structlog {old:.2f} µs, direct {new:.2f} µs ({old - new:.2f} saved)"
    )
    old, new = _labels(200_000)
    print(
        f"labelled child + inc: labels() {old:.2f} µs, cached {new:.2f} µs ({old - new:.2f} saved)"
    )
    old, new, scrape = _budgets(200_000)
    print(
        f"tenant budgets per decision: 3 Gauge.set {old:.2f} µs, dict write {new:.2f} µs "
        f"({old - new:.2f} saved); /metrics render with 100 tenants {scrape:.0f} µs"
    )
    old, new = _headers(100_000)
    print(
        f"x-ratelimit-* headers: dict + encode {old:.2f} µs, pairs {new:.2f} µs "
        f"({old - new:.2f} saved)"
    )
    old, new = _macs(100_000)
    print(
        f"HMAC-SHA256 of an identity: hmac.new {old:.2f} µs, keyed copy {new:.2f} µs "
        f"({old - new:.2f} saved)"
    )
    old, new = _timeouts(20_000)
    print(
        f"decision bound (beyond a bare block): asyncio.timeout {old:.2f} µs, "
        f"SharedTimeout {new:.2f} µs ({old - new:.2f} saved)"
    )
    old, new = _keepalive_reads(20_000)
    print(
        f"agent stream read with keep-alive (beyond a bare read): asyncio.wait {old:.2f} µs, "
        f"one timer per stream {new:.2f} µs ({old - new:.2f} saved)"
    )
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
