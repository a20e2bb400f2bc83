"""Prometheus metrics of the auth service, on a registry of its own per app.

A registry per app (not the global one) lets tests run several apps in one
process. The key-cache hit ratio is ``sum(rate(nz_auth_key_cache_total{
result=~"local_hit|redis_hit"}[5m])) / sum(rate(nz_auth_key_cache_total[5m]))``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.limits import LevelUsage

__all__ = ["AuthMetrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class AuthMetrics:
    """The auth service's counters and histograms; children are cached per label set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._decisions = Counter(
            "nz_auth_decisions",
            "Authorization decisions by outcome (allowed/refused/unavailable) and reason.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "nz_auth_decision_seconds",
            "Time to decide one /authorize request.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._key_cache = Counter(
            "nz_auth_key_cache",
            "Key lookups by where they were answered: local_hit, redis_hit, negative_hit, miss.",
            ["result"],
            registry=self.registry,
        )
        self._argon2 = Counter(
            "nz_auth_argon2_verifications",
            "Argon2id verifications run (each one costs ~20 ms of a core).",
            ["result"],
            registry=self.registry,
        )
        self._fingerprints = Counter(
            "nz_auth_key_fingerprints",
            "Stored key fingerprints checked on a cache miss, by verdict: match,"
            " match_previous_secret (re-keyed under NZ_GATEWAY_SECRET), mismatch,"
            " unknown (none yet, or under a secret this replica lacks: Argon2 decides).",
            ["verdict"],
            registry=self.registry,
        )
        self.argon2_throttled = Counter(
            "nz_auth_argon2_throttled",
            "Candidate keys refused without Argon2 because their prefix failed too often.",
            registry=self.registry,
        )
        self.revocation_lag_seconds = Histogram(
            "nz_auth_revocation_lag_seconds",
            "Time from a NOTIFY on nz_key_events to its delivery here (measured by pings).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._key_events = Counter(
            "nz_auth_key_events",
            "Key change notifications received, by kind (key, tenant, unknown).",
            ["kind"],
            registry=self.registry,
        )
        self.listener_up = Gauge(
            "nz_auth_key_listener_up",
            "1 while LISTEN nz_key_events is active; 0 during a gap (local cache bypassed).",
            registry=self.registry,
        )
        self.cache_flushes = Counter(
            "nz_auth_key_cache_flushes",
            "Whole-cache flushes (after a listener gap or a failed eviction).",
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "nz_auth_dependency_up",
            "1 when the dependency (redis, postgres) answered at the last scrape, else 0.",
            ["dependency"],
            registry=self.registry,
        )
        #: each tenant's limits and counters at its last decision, read at scrape time
        self._budgets: dict[str, tuple[Limits, LevelUsage]] = {}
        self.registry.register(_TenantBudgets(self._budgets))
        self._children: dict[tuple[str, ...], Counter] = {}

    def _child(self, metric: Counter, *labels: str) -> Counter:
        key = (metric._name, *labels)  # prometheus_client keeps the metric name there
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def decision(self, outcome: str, reason: str, seconds: float) -> None:
        """Count one decision and observe its latency."""
        self._child(self._decisions, outcome, reason).inc()
        self.decision_seconds.observe(seconds)

    def key_cache(self, result: str) -> None:
        """Count one key lookup by where it was answered."""
        self._child(self._key_cache, result).inc()

    def argon2(self, matched: bool) -> None:
        """Count one Argon2id verification."""
        self._child(self._argon2, "match" if matched else "mismatch").inc()

    def fingerprint(self, verdict: str) -> None:
        """Count one stored fingerprint checked against a presented key."""
        self._child(self._fingerprints, verdict).inc()

    def key_event(self, kind: str) -> None:
        """Count one ``nz_key_events`` notification."""
        self._child(self._key_events, kind).inc()

    def tenant_budgets(self, tenant: str, limits: Limits, used: LevelUsage | None) -> None:
        """Keep the tenant's limits and counters of one decision (the shares are computed
        at scrape time: :class:`_TenantBudgets`)."""
        if used is not None:
            self._budgets[tenant] = (limits, used)

    def dependencies(self, **up: bool) -> None:
        """Record what the scrape-time probes found (``redis=True, postgres=False``)."""
        for name, ok in up.items():
            self.dependency_up.labels(name).set(1 if ok else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


_BUDGET_NAME = "nz_auth_tenant_budget_remaining_ratio"
_BUDGET_HELP = (
    "Share of a tenant's token budget (daily, monthly, total) left at its last decision "
    "on this replica (1 = untouched, 0 = spent); take min() across replicas."
)


class _TenantBudgets(Collector):
    """``nz_auth_tenant_budget_remaining_ratio{tenant,budget}``, computed when scraped.

    A decision only stores its tenant's limits and counters (one dict write);
    the shares are worked out here, from the last decision of each tenant. A
    budget that last decision did not count (no limit, or no counter) keeps
    the share shown before, as the per-decision gauge it replaces did.
    """

    def __init__(self, budgets: dict[str, tuple[Limits, LevelUsage]]) -> None:
        self._budgets = budgets
        self._shown: dict[tuple[str, str], float] = {}

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(_BUDGET_NAME, _BUDGET_HELP, labels=("tenant", "budget"))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for tenant, (limits, used) in list(self._budgets.items()):
            for budget, limit, spent in (
                ("daily", limits.daily_tokens, used.daily),
                ("monthly", limits.monthly_tokens, used.monthly),
                ("total", limits.total_tokens, used.total),
            ):
                if limit is not None and spent is not None:
                    ratio = max(0, limit - spent) / limit if limit > 0 else 0.0
                    self._shown[(tenant, budget)] = ratio
        family = GaugeMetricFamily(_BUDGET_NAME, _BUDGET_HELP, labels=("tenant", "budget"))
        for (tenant, budget), ratio in self._shown.items():
            family.add_metric((tenant, budget), ratio)
        yield family
