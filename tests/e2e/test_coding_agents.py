"""The real coding agents from npm, run as a user would, through Caddy, auth and proxy.

``claude -p`` (``@anthropic-ai/claude-code``, Anthropic's Messages API) and
``codex exec`` (``@openai/codex``, OpenAI's Responses API) answer with the
simulator's text, and every request they made is in the ledger with the
token counts the simulator reported. The CLIs come from
``scripts/bootstrap.sh`` (``.tools/npm``, pinned there); without them these
tests fail, they never skip.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from neuronetz_gateway.simulator import PROMPT_OVERHEAD, THINKING, simulated_text
from neuronetz_gateway.simulator.content import count_words
from tests.e2e.conftest import Ledger
from tests.e2e.processes import ROOT, E2EStack, sim_clear, sim_requests

pytestmark = pytest.mark.e2e

BIN = ROOT / ".tools" / "npm" / "node_modules" / ".bin"
TIMEOUT = 120
ANSWER = simulated_text(20)


def _agent(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/bootstrap.sh (installs the coding agents)")
    return str(path)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": str(cwd), "LANG": "C.UTF-8", "NO_COLOR": "1"}
    return subprocess.run(
        argv,
        env={**base, **env},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _simulated_counts(body: dict[str, Any]) -> tuple[int, int]:
    """What the simulator charges for one /api/chat body (its documented rule)."""
    contents = [m.get("content") or "" for m in body["messages"]]
    thinking = len(THINKING) if body.get("think") not in (None, False) else 0
    return count_words(*contents) + PROMPT_OVERHEAD, thinking + 20


async def _check_ledger(
    ledger: Ledger, tenant: str, route: str, stack: E2EStack
) -> list[dict[str, Any]]:
    chats = [r for r in sim_requests(stack) if r["path"] == "/api/chat"]
    assert chats, "nothing reached the model"
    totals = await ledger.wait_for_requests(tenant, len(chats))
    rows = await ledger.audit(tenant)
    generations = [r for r in rows if r["route"] == route]
    assert all(r["status"] == 200 and not r["estimated"] for r in generations)
    # each request charged exactly what the model (simulator) counted for it
    charged = sorted((r["prompt_tokens"], r["completion_tokens"]) for r in generations)
    assert charged == sorted(_simulated_counts(c["body"]) for c in chats)  # type: ignore[arg-type]
    assert totals.prompt_tokens == sum(r["prompt_tokens"] for r in rows)
    return generations


async def test_claude_code_answers_through_the_gateway(e2e_stack: E2EStack, ledger: Ledger) -> None:
    claude = _agent("claude")
    caller = await ledger.issue()
    sim_clear(e2e_stack)
    env = {
        "ANTHROPIC_BASE_URL": e2e_stack.url,
        "ANTHROPIC_AUTH_TOKEN": caller.key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    with tempfile.TemporaryDirectory(prefix="nz-claude-") as home:
        done = _run([claude, "-p", "say hi", "--model", "llama3.2"], env, Path(home))
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert ANSWER in done.stdout
    rows = await _check_ledger(ledger, caller.tenant, "v1.messages", e2e_stack)
    assert len(rows) == 1  # one turn: measured 2522 prompt + 24 (4 thinking) completion tokens


async def test_codex_exec_answers_through_the_gateway(e2e_stack: E2EStack, ledger: Ledger) -> None:
    codex = _agent("codex")
    caller = await ledger.issue()
    sim_clear(e2e_stack)
    with tempfile.TemporaryDirectory(prefix="nz-codex-") as home:
        codex_home = Path(home) / ".codex"
        codex_home.mkdir()
        (codex_home / "config.toml").write_text(
            'model = "llama3.2"\n'
            'model_provider = "neuronetz"\n'
            "[model_providers.neuronetz]\n"
            'name = "neuronetz gateway"\n'
            f'base_url = "{e2e_stack.url}/v1"\n'
            'env_key = "NZ_API_KEY"\n'
            'wire_api = "responses"\n'
        )
        env = {"CODEX_HOME": str(codex_home), "NZ_API_KEY": caller.key}
        argv = [codex, "exec", "--skip-git-repo-check", "say hi"]
        done = _run(argv, env, Path(home))
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert ANSWER in done.stdout
    rows = await _check_ledger(ledger, caller.tenant, "v1.responses", e2e_stack)
    assert len(rows) == 1  # one turn: measured 3123 prompt + 20 completion tokens
