"""Through real Caddy: what the services' /metrics show after traffic, and that every
metric the Grafana dashboard and the Prometheus alert rules name is really exported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}


def _scrape(urls: list[str]) -> str:
    return "\n".join(httpx.get(u + "/metrics", timeout=10).text for u in urls)


def _exported_names(text: str) -> set[str]:
    """Every series name the exposition declares (TYPE lines, with their suffixes) or shows."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no sample {name} {labels}"
    return total


def _named_metrics() -> set[str]:
    dashboard = json.loads((ROOT / "docs/grafana/neuronetz-gateway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((ROOT / "docs/prometheus/alerts.yml").read_text())
    return {m for e in exprs for m in re.findall(r"\bnz_[a-z0-9_]+\b", e)}


async def test_metrics_after_traffic_and_every_named_metric_exists(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(daily_tokens=100_000)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        for _ in range(4):  # Caddy spreads these over both replicas of each service
            assert (await client.post("/api/chat", json=CHAT, headers=auth)).status_code == 200
    await ledger.wait_for_requests(caller.tenant, 4)
    auth_text = _scrape(e2e_stack.auth_urls)
    proxy_text = _scrape(e2e_stack.proxy_urls)

    totals = await ledger.usage(caller.tenant)
    charged = _value(proxy_text, "nz_proxy_tenant_tokens_total", tenant=caller.tenant)
    assert charged == totals.prompt_tokens + totals.completion_tokens > 0
    assert _value(
        proxy_text, "nz_proxy_tenant_tokens_total", tenant=caller.tenant, model="llama3.2:latest"
    )
    assert _value(proxy_text, "nz_proxy_backend_in_flight", backend="default") == 0  # all done
    assert _value(proxy_text, "nz_proxy_backend_tokens_total", backend="default") >= charged
    assert _value(proxy_text, "nz_proxy_backend_ttft_seconds_count", backend="default") >= 4
    for dependency in ("redis", "postgres"):
        assert _value(proxy_text, "nz_proxy_dependency_up", dependency=dependency) == 2
        assert _value(auth_text, "nz_auth_dependency_up", dependency=dependency) == 2
    assert _value(proxy_text, "nz_proxy_backend_up", backend="default") == 2
    # the budget was charged: a replica's last decision saw less than all of it left
    ratios = [
        float(line.rsplit(" ", 1)[1])
        for line in auth_text.splitlines()
        if line.startswith("nz_auth_tenant_budget_remaining_ratio{")
        and f'tenant="{caller.tenant}"' in line
        and 'budget="daily"' in line
    ]
    assert ratios and all(0 < r <= 1 for r in ratios) and min(ratios) < 1

    missing = _named_metrics() - _exported_names(auth_text + "\n" + proxy_text)
    assert not missing, f"named by the dashboard or the alerts but not exported: {missing}"
