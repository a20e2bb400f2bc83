"""The Grafana dashboard validates against Grafana's own JSON Schema for the ``schemaVersion``
it names (vendored from the Grafana Foundation SDK: tests/support/grafana_schema/SOURCE.md),
and the Prometheus alert rules pass ``promtool check rules`` (Debian's prometheus package, which
scripts/bootstrap.sh installs). Which metrics they name is checked against live /metrics
output in tests/e2e/test_observability.py."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs/grafana/neuronetz-gateway.json"
ALERTS = ROOT / "docs/prometheus/alerts.yml"
GRID_COLUMNS = 24
SCHEMAS = ROOT / "tests/support/grafana_schema"
#: The vendored schema folder for each dashboard ``schemaVersion``.
SCHEMA_FOLDER = {39: "v11.5.x"}
#: What Grafana's export adds around the dashboard and its import consumes (not the kind).
EXPORT_ENVELOPE = ("__inputs", "__requires", "__elements")


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


def _validator(folder: str, file: str, definition: str | None = None) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / folder / f"{file}.jsonschema.json").read_text())
    if definition is not None:
        schema = {**schema, "$ref": f"#/definitions/{definition}"}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(dash: dict[str, Any]) -> list[str]:
    """Where ``dash`` breaks Grafana's schemas for the ``schemaVersion`` it names.

    The dashboard kind for the whole; for each time series panel its plugin's
    ``options`` and ``fieldConfig.defaults.custom``; for each Prometheus target the
    Prometheus query schema. Empty when the dashboard is valid.
    """
    version = dash.get("schemaVersion")
    folder = SCHEMA_FOLDER.get(version) if isinstance(version, int) else None
    if folder is None:
        return [f"schemaVersion {version!r}: no Grafana schema vendored for it (SOURCE.md)"]
    found: list[str] = []

    def check(validator: jsonschema.Draft7Validator, value: Any, where: str) -> None:
        for error in validator.iter_errors(value):
            path = "/".join(str(part) for part in error.absolute_path)
            found.append(f"{where}/{path}: {error.message}")

    body = {k: v for k, v in dash.items() if k not in EXPORT_ENVELOPE}
    check(_validator(folder, "dashboard"), body, "dashboard")
    options = _validator(folder, "timeseries", "Options")
    field_config = _validator(folder, "timeseries", "FieldConfig")
    query = _validator(folder, "prometheus")
    for i, panel in enumerate(p for p in body.get("panels", []) if isinstance(p, dict)):
        if panel.get("type") == "timeseries":
            check(options, panel.get("options", {}), f"panels/{i}/options")
            custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
            if custom is not None:
                check(field_config, custom, f"panels/{i}/fieldConfig/defaults/custom")
        for j, target in enumerate(panel.get("targets", [])):
            source = target.get("datasource", {}) if isinstance(target, dict) else {}
            if source.get("type") == "prometheus":
                check(query, target, f"panels/{i}/targets/{j}")
    return found


def test_dashboard_validates_against_grafanas_schema_for_its_version() -> None:
    assert schema_errors(_dashboard()) == []


def _drop_panel_type(d: dict[str, Any]) -> None:
    del d["panels"][0]["type"]


def _unknown_top_level_field(d: dict[str, Any]) -> None:
    d["panel"] = d["panels"]


def _grid_width_as_text(d: dict[str, Any]) -> None:
    d["panels"][0]["gridPos"]["w"] = "12"


def _no_templating(d: dict[str, Any]) -> None:
    del d["templating"]


def _query_without_expr(d: dict[str, Any]) -> None:
    del d["panels"][0]["targets"][0]["expr"]


def _bad_legend_mode(d: dict[str, Any]) -> None:
    d["panels"][0]["options"]["legend"]["displayMode"] = "sideways"


def _unvendored_schema_version(d: dict[str, Any]) -> None:
    d["schemaVersion"] = 12


@pytest.mark.parametrize(
    "breakage",
    [
        _drop_panel_type,
        _unknown_top_level_field,
        _grid_width_as_text,
        _no_templating,
        _query_without_expr,
        _bad_legend_mode,
        _unvendored_schema_version,
    ],
)
def test_an_invalid_dashboard_fails_the_schema(breakage: Callable[[dict[str, Any]], None]) -> None:
    broken = copy.deepcopy(_dashboard())
    breakage(broken)
    assert schema_errors(broken) != []


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
        "queue depth",
        "queue wait",
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
