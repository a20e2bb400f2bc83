"""The abuse corpus through real Caddy on every surface: never a 5xx, never an uncapped run."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from neuronetz_gateway.domain.body_keys import case_variant_field
from neuronetz_gateway.domain.options import KeepAliveWindow, OptionError, check_keep_alive
from tests.e2e.abuse_corpus import PROBES
from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_clear, sim_requests

pytestmark = pytest.mark.e2e

CAP = 16
WINDOW = KeepAliveWindow(min_seconds=60, max_seconds=86400)  # the settings' defaults


def _violations(upstream: dict[str, Any]) -> list[str]:
    """What an upstream model request must not carry past a capped key."""
    body = upstream["body"]
    found = []
    if not isinstance(body, dict):
        return found
    if upstream["path"] in {"/api/chat", "/api/generate"}:
        num_predict = (body.get("options") or {}).get("num_predict")
        if type(num_predict) is not int or not 1 <= num_predict <= CAP:
            found.append(f"num_predict {num_predict!r}")
    if "keep_alive" in body:
        try:
            check_keep_alive(body["keep_alive"], WINDOW)
        except OptionError:
            found.append(f"keep_alive {body['keep_alive']!r}")
    field = case_variant_field(body)
    if field is not None:
        found.append(f"case-variant field {field}")
    return found


async def test_the_abuse_corpus_gets_4xx_or_a_capped_run_on_every_surface(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(max_num_predict=CAP)
    headers = {
        "Authorization": f"Bearer {caller.key}",
        "Content-Type": "application/json",
        "anthropic-version": "2023-06-01",
    }
    server_faults: dict[str, int] = {}
    escaped: dict[str, list[str]] = {}
    statuses: Counter[int] = Counter()
    probe_of: dict[str, str] = {}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        for name, path, raw in PROBES:
            answer = await client.post(path, content=raw, headers=headers)
            statuses[answer.status_code] += 1
            probe_of[answer.headers.get("x-request-id", "")] = f"{path} {name}"
            if answer.status_code >= 500:
                server_faults[f"{path} {name}"] = answer.status_code
    for upstream in sim_requests(e2e_stack):
        problems = _violations(upstream)
        if problems:
            request_id = upstream["headers"].get("x-request-id", "")  # type: ignore[union-attr]
            escaped[probe_of.get(request_id, request_id)] = problems
    assert server_faults == {}
    assert escaped == {}
    # the corpus exercises both outcomes: refusals and capped runs
    assert statuses[400] > 100
    assert statuses[200] > 50
    logs = "\n".join(p.log_tail(2000) for p in e2e_stack.processes if p.name.startswith("proxy"))
    assert "Traceback" not in logs
