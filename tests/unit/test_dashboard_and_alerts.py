"""The Grafana dashboard is a well-formed dashboard of the schema version it names, and the
Prometheus alert rules pass ``promtool check rules`` (Debian's prometheus package, which
scripts/bootstrap.sh installs). Which metrics they name is checked against live /metrics
output in tests/e2e/test_observability.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs/grafana/neuronetz-gateway.json"
ALERTS = ROOT / "docs/prometheus/alerts.yml"
GRID_COLUMNS = 24


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_dashboard_has_the_fields_its_schema_version_requires() -> None:
    dash = _dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    assert isinstance(dash["time"]["from"], str) and isinstance(dash["time"]["to"], str)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in grid.values())
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_COLUMNS and grid["h"] > 0
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in panel["targets"])


def test_dashboard_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


def test_dashboard_covers_what_operators_watch() -> None:
    titles = " | ".join(p["title"].lower() for p in _dashboard()["panels"])
    for topic in (
        "decisions by outcome",
        "latency",
        "tokens by tenant and model",
        "budget",
        "429",
        "503",
        "in flight",
        "first token",
        "tokens per second",
        "health",
        "audit",
        "revocation lag",
    ):
        assert topic in titles, topic


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/bootstrap.sh (Debian's prometheus package)"
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_failures_that_page() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "NzGateway503Rate",
        "NzAllBackendsDown",
        "NzBackendDown",
        "NzBackendQueueWait",
        "NzAuditSpoolGrowing",
        "NzRevocationLagHigh",
        "NzRedisUnreachable",
        "NzPostgresUnreachable",
        "NzTenantBudgetNearlySpent",
    } <= names
    assert all(r["annotations"]["summary"] for r in rules)
