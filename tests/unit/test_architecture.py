"""Layering: the domain stays pure, the proxy's steps depend on ports, not adapters."""

from __future__ import annotations

import ast
from pathlib import Path

from neuronetz_gateway import domain, proxy

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


#: The proxy modules allowed to import adapters: the composition root, the ports
#: (which re-export the adapters' error types), the background readers that
#: talk to Ollama's /api/tags, Redis' shared backend statuses and Postgres'
#: LISTEN themselves, and the backend pool (the Upstream port over many Ollama
#: clients and the Redis slots).
PROXY_EDGES = {
    "app.py",
    "ports.py",
    "discovery.py",
    "fleet_discovery.py",
    "revocation.py",
    "pool.py",
}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


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


def test_domain_imports_no_adapter_nor_service() -> None:
    folder = Path(domain.__file__).parent
    offenders = {
        p.name: sorted(m for m in _imported_modules(p) if m.split(".")[1:2] != ["domain"])
        for p in folder.glob("*.py")
        if any(
            m.startswith("neuronetz_gateway.") and m.split(".")[1] != "domain"
            for m in _imported_modules(p)
        )
    }
    assert offenders == {}


def test_proxy_steps_depend_on_ports_not_adapters() -> None:
    folder = Path(proxy.__file__).parent
    modules = sorted(p for p in folder.glob("*.py") if p.name not in PROXY_EDGES)
    assert len(modules) > 8
    offenders = {
        p.name: sorted(
            m
            for m in _imported_modules(p)
            if m.startswith(("neuronetz_gateway.adapters", "neuronetz_gateway.auth"))
            or m.split(".")[0] in FORBIDDEN - {"asyncio", "litestar"}
        )
        for p in modules
    }
    assert {name: found for name, found in offenders.items() if found} == {}
