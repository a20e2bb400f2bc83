"""A git ref's ``services/`` unpacked apart, for the A/B scripts' base side."""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

__all__ = ["REPO_ROOT", "export_services"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def export_services(ref: str, into: Path) -> Path:
    """``services/`` as it is at ``ref``, unpacked under ``into``; the unpacked path."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "services"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "services"
