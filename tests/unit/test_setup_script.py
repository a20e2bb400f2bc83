"""The README's set-up is what CI runs: one script, pinned tools, no second copy.

A new user's set-up once broke (an unpinned `pip install pdm`) while CI, which
pinned a dependency itself, stayed green. These tests keep the two the same.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = "bash scripts/bootstrap.sh"


def _shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_sets_up_with_the_script_ci_runs() -> None:
    readme_lines = [
        line.strip()
        for block in _shell_blocks((ROOT / "README.md").read_text())
        for line in block.splitlines()
    ]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert BOOTSTRAP in readme_lines
    assert BOOTSTRAP in ci_lines
    # CI runs the README's two commands' checks, and installs nothing on its own.
    assert "task test" in ci_lines
    assert not [line for line in ci_lines if re.search(r"\b(pip|apt-get|npm)\b", line)]


def test_readme_installs_nothing_outside_the_script() -> None:
    for block in _shell_blocks((ROOT / "README.md").read_text()):
        for line in block.splitlines():
            assert not re.search(r"\b(pip|pip3|apt-get|apt)\s+install\b", line), line


def test_setup_tools_are_pinned_exactly() -> None:
    requirements = [
        line.split("#", 1)[0].strip()
        for line in (ROOT / "tools" / "requirements.txt").read_text().splitlines()
    ]
    pins = [line for line in requirements if line]
    assert pins
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[[a-z0-9,]+\])?==[0-9][0-9A-Za-z.+-]*", pin), pin
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "-r tools/requirements.txt" in script


def test_coding_agents_are_pinned_exactly_and_installed_by_the_script() -> None:
    lines = (ROOT / "tools" / "coding-agents.txt").read_text().splitlines()
    pins = [line.split("#", 1)[0].strip() for line in lines]
    pins = [pin for pin in pins if pin]
    assert {pin.rsplit("@", 1)[0] for pin in pins} == {"@anthropic-ai/claude-code", "@openai/codex"}
    for pin in pins:
        assert re.fullmatch(r"@[a-z0-9-]+/[a-z0-9-]+@[0-9]+\.[0-9]+\.[0-9]+", pin), pin
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "tools/coding-agents.txt" in script
    assert "npm install --prefix .tools/npm" in script
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".tools" in ignored or ".tools/" in ignored  # a directory, or a link to one


def test_no_checkout_local_tools_are_tracked() -> None:
    """`.tools` holds this checkout's npm installs: tracked (a worktree's link to
    another checkout slipped in twice), a fresh clone's bootstrap writes elsewhere."""
    tracked = subprocess.run(
        ["git", "ls-files", ".tools", ".venv"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert tracked == ""
