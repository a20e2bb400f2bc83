"""The proxy's Prometheus metrics, on a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ProxyMetrics"]

_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ProxyMetrics:
    """Requests by route and status, tokens, time to first byte, upstream errors, audit backlog."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nz_proxy_requests_total",
            "Proxied requests by route and final status.",
            ("route", "status"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "nz_proxy_tokens_total",
            "Tokens charged, by kind (prompt or completion).",
            ("kind",),
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "nz_proxy_ttfb_seconds",
            "Time from request to the first upstream byte sent to the client.",
            ("route",),
            buckets=_TTFB_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "nz_proxy_upstream_errors_total",
            "Upstream failures by kind (unavailable, timeout, busy, midstream, status).",
            ("kind",),
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "nz_proxy_client_disconnects_total",
            "Streams cut short by the client.",
            registry=self.registry,
        )
        self.identity_replays = Counter(
            "nz_proxy_identity_replays_total",
            "Signed identities presented again after their one use (answered 401).",
            registry=self.registry,
        )
        self.audit_queue = Gauge(
            "nz_proxy_audit_queue_depth", "Audit rows waiting for a batch.", registry=self.registry
        )
        self.audit_spool = Gauge(
            "nz_proxy_audit_spool_files",
            "Audit batches kept on disk until Postgres is back.",
            registry=self.registry,
        )

    def watch_audit(
        self, queue_depth: Callable[[], float], spool_files: Callable[[], float]
    ) -> None:
        """Read the audit backlog at scrape time (no work on the hot path)."""
        self.audit_queue.set_function(queue_depth)
        self.audit_spool.set_function(spool_files)

    def render(self) -> bytes:
        """The text exposition format."""
        return bytes(generate_latest(self.registry))
