"""``neuronetz-gateway doctor`` against a healthy stack and against each broken piece.

Real Postgres (the run's migrated database, and an empty one made here), real
Redis, the bundled simulator for Ollama, the real ``caddy validate``; the CLI
runs in a subprocess, as an operator runs it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from neuronetz_gateway.devstack.servers import free_port
from tests.support.cli import run_cli
from tests.support.proxy_stack import SimulatorServer

pytest_plugins = ["tests.support.proxy_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
STRONG = secrets.token_urlsafe(36)
NAMES = ["settings", "secret", "postgres", "migrations", "redis", "ollama", "caddyfile"]


def _doctor(database_url: str, env: dict[str, str | None], *args: str) -> tuple[int, Any]:
    result = run_cli(database_url, "doctor", "--json", *args, check=False, env_changes=env)
    return result.returncode, json.loads(result.stdout)


def _status(report: Any) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.fixture
def healthy_env(redis_test_url: str, sim: SimulatorServer) -> dict[str, str | None]:
    return {
        "NZ_REDIS_URL": redis_test_url,
        "NZ_OLLAMA_URL": sim.url,
        "NZ_GATEWAY_SECRET": STRONG,
        "NZ_GATEWAY_SECRET_PREVIOUS": None,
    }


@pytest.fixture
async def empty_database(pg_admin_url: str) -> AsyncIterator[str]:
    name = f"nz_doctor_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.close()


def test_healthy_stack_passes_every_check(
    database_url: str, healthy_env: dict[str, str | None]
) -> None:
    code, report = _doctor(database_url, healthy_env, "--caddyfile", str(ROOT / "caddy/Caddyfile"))
    assert code == 0, report
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == NAMES
    assert set(_status(report).values()) == {"ok"}, report
    by_name = {c["name"]: c["detail"] for c in report["checks"]}
    assert "standalone" in by_name["redis"]
    assert "llama3.2" in by_name["ollama"]
    assert STRONG not in str(report)


def test_human_output_is_one_line_per_check(
    database_url: str, healthy_env: dict[str, str | None]
) -> None:
    result = run_cli(database_url, "doctor", env_changes=healthy_env)
    lines = result.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == NAMES
    assert all(line.split()[0] == "ok" for line in lines)


@pytest.mark.parametrize(
    ("broken", "env_change"),
    [
        ("redis", {"NZ_REDIS_URL": "redis://127.0.0.1:{port}/0"}),
        ("ollama", {"NZ_OLLAMA_URL": "http://127.0.0.1:{port}"}),
        ("secret", {"NZ_GATEWAY_SECRET": "short"}),
        ("settings", {"NZ_REDIS_URL": "ftp://nowhere"}),
    ],
)
def test_each_broken_dependency_fails_its_check(
    database_url: str,
    healthy_env: dict[str, str | None],
    broken: str,
    env_change: dict[str, str],
) -> None:
    port = str(free_port())
    env = {**healthy_env, **{k: v.format(port=port) for k, v in env_change.items()}}
    code, report = _doctor(database_url, env)
    assert code == 1
    assert report["ok"] is False
    failed = {name for name, status in _status(report).items() if status == "fail"}
    assert failed == {broken}, report


def test_unreachable_postgres_fails_and_skips_migrations(
    healthy_env: dict[str, str | None],
) -> None:
    code, report = _doctor(f"postgresql://postgres@127.0.0.1:{free_port()}/x", healthy_env)
    assert code == 1
    assert _status(report)["postgres"] == "fail"
    assert _status(report)["migrations"] == "skip"


def test_unmigrated_database_fails_migrations(
    empty_database: str, healthy_env: dict[str, str | None]
) -> None:
    code, report = _doctor(empty_database, healthy_env)
    assert code == 1
    assert _status(report)["postgres"] == "ok"
    assert _status(report)["migrations"] == "fail"
    assert "neuronetz-gateway migrate" in str(report)


def test_invalid_caddyfile_fails(
    database_url: str, healthy_env: dict[str, str | None], tmp_path: Path
) -> None:
    bad = tmp_path / "Caddyfile"
    bad.write_text("http://127.0.0.1:1 {\n\treverse_proxy {\n\t\tno_such_subdirective\n\t}\n}\n")
    code, report = _doctor(database_url, healthy_env, "--caddyfile", str(bad))
    assert code == 1
    assert _status(report)["caddyfile"] == "fail"
    assert {n for n, s in _status(report).items() if s == "fail"} == {"caddyfile"}


async def test_each_defined_backend_is_checked_in_place_of_nz_ollama_url(
    empty_database: str, healthy_env: dict[str, str | None], sim: SimulatorServer
) -> None:
    """With backends defined (its own database: no proxy of this run routes by them),
    doctor checks each one; NZ_OLLAMA_URL is not used (here it names nothing)."""
    run_cli(empty_database, "migrate")
    down = f"http://127.0.0.1:{free_port()}"
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.executemany(
            "INSERT INTO backend (name, url, slots, state) VALUES ($1, $2, 2, $3)",
            [("gpu-up", sim.url, "active"), ("gpu-down", down, "active"),
             ("gpu-drained", down, "draining")],
        )  # fmt: skip
    finally:
        await conn.close()
    env = {**healthy_env, "NZ_OLLAMA_URL": f"http://127.0.0.1:{free_port()}"}
    code, report = _doctor(empty_database, env)
    assert code == 1
    assert _status(report) == {
        **{name: "ok" for name in NAMES if name != "ollama"},
        "ollama": "skip",
        "backend gpu-drained": "warn",
        "backend gpu-down": "fail",
        "backend gpu-up": "ok",
    }, report
    by_name = {c["name"]: c["detail"] for c in report["checks"]}
    assert "llama3.2" in by_name["backend gpu-up"]
    assert "draining" in by_name["backend gpu-drained"]
