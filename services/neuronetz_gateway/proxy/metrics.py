"""The proxy's Prometheus metrics, on a registry of its own (one per app).

Backends are labelled ``backend``; with one Ollama URL that is ``default``
(a fleet, SPEC section 12, names each). Tenant labels are tenant names,
bounded by the tenants an operator creates; models by the installed models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["DEFAULT_BACKEND", "LabelCache", "ProxyMetrics"]

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)

_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
DEFAULT_BACKEND = "default"


class LabelCache:
    """``metric.labels(*values)``, looked up once per label tuple and then kept.

    prometheus_client validates and stringifies the values and takes a lock
    on every ``labels()`` call; the hot path asks for the same few children
    on every request. The cache lives as long as the metrics it serves (and
    holds no more children than the metrics themselves keep); nothing here
    removes a child, so a cached one is never stale.
    """

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}

    def __call__(self, metric: _Metric, *values: str) -> _Metric:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]  # labels() returns the metric's own type


class ProxyMetrics:
    """Requests by route and status, tokens, time to first byte, upstream errors, audit backlog."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: ``child(metric, *labels)``: the labelled child, cached (the hot path's way)
        self.child = LabelCache()
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
        self.revoked_requests = Counter(
            "nz_proxy_revoked_requests_total",
            "Running requests ended because their key was revoked.",
            registry=self.registry,
        )
        self.listener_up = Gauge(
            "nz_proxy_key_listener_up",
            "1 while LISTEN nz_key_events is active (revoked keys' streams are ended).",
            registry=self.registry,
        )
        self.revocation_lag_seconds = Histogram(
            "nz_proxy_revocation_lag_seconds",
            "Time from a NOTIFY on nz_key_events to its delivery here (measured by pings).",
            buckets=_TTFB_BUCKETS,
            registry=self.registry,
        )
        self._key_events = Counter(
            "nz_proxy_key_events_total",
            "nz_key_events notifications received, by kind (key, tenant, unknown).",
            ("kind",),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "nz_proxy_request_duration_seconds",
            "Time from request to the end of its answer (streams included), by route.",
            ("route",),
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "nz_proxy_tenant_tokens_total",
            "Tokens charged by tenant, model and kind (prompt or completion).",
            ("tenant", "model", "kind"),
            registry=self.registry,
        )
        self.backend_in_flight = Gauge(
            "nz_proxy_backend_in_flight",
            "Requests sent to a backend and not yet finished.",
            ("backend",),
            registry=self.registry,
        )
        self.backend_ttft = Histogram(
            "nz_proxy_backend_ttft_seconds",
            "Time from request to a backend's first byte (model load and queueing included).",
            ("backend",),
            buckets=_TTFB_BUCKETS,
            registry=self.registry,
        )
        self.backend_tokens = Counter(
            "nz_proxy_backend_tokens_total",
            "Tokens a backend processed, by kind (prompt or completion): rate() is tokens/s.",
            ("backend", "kind"),
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "nz_proxy_backend_up",
            "1 when the backend answered its probe at the last scrape, else 0.",
            ("backend",),
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "nz_proxy_dependency_up",
            "1 when the dependency (redis, postgres) answered at the last scrape, else 0.",
            ("dependency",),
            registry=self.registry,
        )
        self.settle_retries = Counter(
            "nz_proxy_settle_retries_total",
            "Background retries of settlements Redis did not take, by outcome (failed: one "
            "attempt failed; landed; gave_up: the reservation expired first, or shutdown).",
            ("outcome",),
            registry=self.registry,
        )
        self.backend_in_flight.labels(DEFAULT_BACKEND).set(0)
        self.audit_queue = Gauge(
            "nz_proxy_audit_queue_depth", "Audit rows waiting for a batch.", registry=self.registry
        )
        self.audit_spool = Gauge(
            "nz_proxy_audit_spool_files",
            "Audit files on disk waiting for Postgres (spooled batches, dead processes' journals).",
            registry=self.registry,
        )

    def watch_audit(
        self, queue_depth: Callable[[], float], spool_files: Callable[[], float]
    ) -> None:
        """Read the audit backlog at scrape time (no work on the hot path)."""
        self.audit_queue.set_function(queue_depth)
        self.audit_spool.set_function(spool_files)

    def key_event(self, kind: str) -> None:
        """Count one ``nz_key_events`` notification."""
        self._key_events.labels(kind).inc()

    def probed(self, *, redis: bool, postgres: bool, backends: dict[str, bool]) -> None:
        """Record what the scrape-time probes found."""
        self.dependency_up.labels("redis").set(1 if redis else 0)
        self.dependency_up.labels("postgres").set(1 if postgres else 0)
        for backend, up in backends.items():
            self.backend_up.labels(backend).set(1 if up else 0)

    def render(self) -> bytes:
        """The text exposition format."""
        return bytes(generate_latest(self.registry))
