"""Bad CLI input: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import unique
from tests.support.cli import run_cli, run_cli_json


@pytest.fixture(scope="module")
def tenant_and_prefix(database_url: str) -> tuple[str, str]:
    name = unique("errs")
    run_cli(database_url, "create-tenant", "--name", name)
    created = run_cli_json(database_url, "create-key", "--tenant", name, "--name", "taken")
    return name, created["prefix"]


CASES = [
    (["create-tenant", "--name", "{tenant}"], "already exists"),
    (["create-tenant", "--name", "x", "--rpm", "-1"], "must not be negative"),
    (["create-tenant", "--name", "x", "--models", "a", "--allow-all-models"], "not both"),
    (["create-tenant", "--name", "x", "--rpm", "many"], ""),
    (["create-key", "--tenant", "no-such-tenant", "--name", "k"], "unknown tenant"),
    (["create-key", "--tenant", "{tenant}", "--name", "taken"], "already has a key"),
    (["create-key", "--tenant", "{tenant}", "--name", "k2", "--expires-in-days", "0"], "positive"),
    (
        ["create-key", "--tenant", "{tenant}", "--name", "k3", "--prompt-ttl-days", "3"],
        "--log-prompts",
    ),
    (["list-keys", "--tenant", "no-such-tenant"], "unknown tenant"),
    (["revoke-key", "--prefix", "nz_zzzzzzzz"], "unknown key prefix"),
    (["revoke-key", "--prefix", "garbage"], "not a key prefix"),
    (["rotate-key", "--prefix", "nz_zzzzzzzz"], "unknown key prefix"),
    (["rotate-key", "--prefix", "nz_zzzzzzzz", "--grace-seconds", "-5"], "must not be negative"),
    (["set-limits", "--rpm", "5"], "exactly one of"),
    (["set-limits", "--tenant", "{tenant}"], "nothing to change"),
    (["set-limits", "--tenant", "{tenant}", "--clear", "bogus"], "unknown setting"),
    (["set-limits", "--tenant", "{tenant}", "--tpm", "-3"], "must not be negative"),
    (["usage", "--tenant", "{tenant}", "--since", "yesterday"], "ISO 8601"),
    (["create-tenant", "--name", "z", "--rpm", "0"], "at least 1"),
    (["create-tenant", "--name", "z", "--concurrency", "0"], "at least 1"),
    (["create-tenant", "--name", "z", "--rpm", "3000000000"], "at most 2147483647"),
    (["create-tenant", "--name", "x" * 101], "at most 100 characters"),
    (["create-tenant", "--name", "bell\x07"], "control characters"),
    (["set-limits", "--tenant", "{tenant}", "--tpm", "0"], "at least 1"),
    (
        ["create-key", "--tenant", "{tenant}", "--name", "k4", "--expires-in-days", "9999999999"],
        "at most 36500",
    ),
    (
        [
            "create-key",
            "--tenant",
            "{tenant}",
            "--name",
            "k5",
            "--log-prompts",
            "--prompt-ttl-days",
            "99999999999",
        ],
        "between 1 and 36500",
    ),
    (["rotate-key", "--prefix", "{prefix}", "--grace-seconds", "99999999999999"], "at most"),
    (["audit", "--tenant", "{tenant}", "--limit", "0"], "positive"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
async def test_bad_input_is_one_line_and_non_zero(
    database_url: str, tenant_and_prefix: tuple[str, str], args: list[str], message: str
) -> None:
    tenant, prefix = tenant_and_prefix
    argv = [a.replace("{tenant}", tenant).replace("{prefix}", prefix) for a in args]
    result = await asyncio.to_thread(run_cli, database_url, *argv, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    if message:
        assert len(lines) == 1, result.stderr
        assert message in lines[0]


async def test_unreachable_database_is_one_line() -> None:
    result = await asyncio.to_thread(
        run_cli, "postgresql://postgres@127.0.0.1:1/nope", "list-keys", "--tenant", "x", check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: database error")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_unmigrated_database_says_so(pg_admin_url: str) -> None:
    result = await asyncio.to_thread(
        run_cli, pg_admin_url, "list-keys", "--tenant", "x", check=False
    )
    assert result.returncode == 1
    assert "not migrated" in result.stderr
