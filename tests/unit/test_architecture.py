"""The domain stays pure: no module under ``domain/`` imports an I/O library."""

from __future__ import annotations

import ast
from pathlib import Path

from neuronetz_gateway import domain

FORBIDDEN = {
    "aiohttp",
    "asyncio",
    "asyncpg",
    "granian",
    "httpx",
    "litestar",
    "piccolo",
    "redis",
    "socket",
    "subprocess",
    "structlog",
    "argon2",
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_domain_imports_no_io() -> None:
    folder = Path(domain.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert len(modules) > 5
    offenders = {
        p.name: sorted(_imported_roots(p) & FORBIDDEN)
        for p in modules
        if _imported_roots(p) & FORBIDDEN
    }
    assert offenders == {}


def test_the_check_catches_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import redis.asyncio\nfrom httpx import AsyncClient\n")
    assert _imported_roots(bad) & FORBIDDEN == {"redis", "httpx"}
