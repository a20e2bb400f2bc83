"""The tenant budget gauge, computed at scrape time from each tenant's last decision."""

from __future__ import annotations

from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.limits import LevelUsage

NAME = "nz_auth_tenant_budget_remaining_ratio"


def _budget_lines(metrics: AuthMetrics) -> list[str]:
    return [line for line in metrics.render().decode().splitlines() if NAME in line]


def test_the_shares_of_the_last_decision_are_exposed_as_a_gauge() -> None:
    metrics = AuthMetrics()
    limits = Limits(daily_tokens=1000, monthly_tokens=5000, total_tokens=0)
    metrics.tenant_budgets("acme", limits, LevelUsage(daily=100, monthly=6000, total=3))
    metrics.tenant_budgets("acme", limits, LevelUsage(daily=250, monthly=6000, total=3))
    assert _budget_lines(metrics) == [
        f"# HELP {NAME} Share of a tenant's token budget (daily, monthly, total) left at its last"
        " decision on this replica (1 = untouched, 0 = spent); take min() across replicas.",
        f"# TYPE {NAME} gauge",
        f'{NAME}{{budget="daily",tenant="acme"}} 0.75',
        f'{NAME}{{budget="monthly",tenant="acme"}} 0.0',
        f'{NAME}{{budget="total",tenant="acme"}} 0.0',
    ]


def test_a_budget_the_last_decision_did_not_count_keeps_its_share() -> None:
    metrics = AuthMetrics()
    metrics.tenant_budgets("acme", Limits(daily_tokens=1000), LevelUsage(daily=500))
    assert _budget_lines(metrics)[2:] == [f'{NAME}{{budget="daily",tenant="acme"}} 0.5']
    metrics.tenant_budgets("acme", Limits(monthly_tokens=10), LevelUsage(monthly=1))
    metrics.tenant_budgets("beta", Limits(daily_tokens=10), None)  # no counters: nothing kept
    assert _budget_lines(metrics)[2:] == [
        f'{NAME}{{budget="daily",tenant="acme"}} 0.5',
        f'{NAME}{{budget="monthly",tenant="acme"}} 0.9',
    ]


def test_no_decision_yet_exposes_the_family_without_samples() -> None:
    assert len(_budget_lines(AuthMetrics())) == 2
