"""Run the real ``neuronetz-gateway`` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["run_cli", "run_cli_json"]


def run_cli(
    database_url: str,
    *args: str,
    check: bool = True,
    env_changes: Mapping[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The CLI with this environment, ``NZ_DATABASE_URL`` and ``env_changes`` (None unsets)."""
    env = {**os.environ, "NZ_DATABASE_URL": database_url}
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = subprocess.run(
        [sys.executable, "-m", "neuronetz_gateway.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({result.returncode}): {result.stderr}")
    return result


def run_cli_json(
    database_url: str, *args: str, env_changes: Mapping[str, str | None] | None = None
) -> Any:
    return json.loads(run_cli(database_url, *args, "--json", env_changes=env_changes).stdout)
