"""``backend add|list|drain|enable|remove`` and tenant weights, on real Postgres and Redis."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from typer.testing import CliRunner

from neuronetz_gateway.adapters.backend_board import BackendBoard
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_slots import SlotAdmission, SlotLease
from neuronetz_gateway.cli.main import app
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import BackendSpec, BackendState
from neuronetz_gateway.domain.errors import Conflict, InvalidInput, NotFound
from tests.conftest import unique
from tests.support.cli import run_cli, run_cli_json

pytestmark = pytest.mark.integration


async def _publish(redis_url: str, prefix: str, status: BackendStatus) -> SlotLease:
    """Share ``status`` as the proxies do, and hold one of its slots as a running request."""
    client = await open_redis(redis_url)
    admission = SlotAdmission(client, prefix=prefix)
    try:
        await BackendBoard(client, prefix=prefix).publish(status, ttl_ms=60_000)
        return await admission.acquire(status.name, capacity=4, tenant="t1", queue_timeout=1.0)
    finally:
        await admission.aclose()
        await close_redis(client)


async def _release(redis_url: str, prefix: str, lease: SlotLease) -> None:
    client = await open_redis(redis_url)
    admission = SlotAdmission(client, prefix=prefix)
    try:
        await admission.release(lease, capacity=4)
    finally:
        await admission.aclose()
        await close_redis(client)


def test_backend_lifecycle_through_the_cli(
    database_url: str, redis_test_url: str, redis_prefix: str
) -> None:
    env = {"NZ_REDIS_URL": redis_test_url, "NZ_REDIS_PREFIX": redis_prefix}
    name = unique("gpu")
    added = run_cli_json(
        database_url,
        "backend", "add", "--name", name, "--url", "http://10.0.0.5:11434/", "--slots", "4",
        "--weight", "2",
    )  # fmt: skip
    assert {k: added[k] for k in ("name", "url", "slots", "weight", "state", "source")} == {
        "name": name,
        "url": "http://10.0.0.5:11434",
        "slots": 4,
        "weight": 2,
        "state": "active",
        "source": "database",
    }
    try:
        # what the proxies share in Redis shows up in the listing
        status = BackendStatus(
            name=name,
            url=added["url"],
            checked_at=time.time(),
            reachable=True,
            installed=("llama3.2:latest", "qwen2.5:0.5b"),
            loaded=("llama3.2:latest",),
        )
        lease = asyncio.run(_publish(redis_test_url, redis_prefix, status))
        listed = run_cli_json(database_url, "backend", "list", env_changes=env)
        asyncio.run(_release(redis_test_url, redis_prefix, lease))
        mine = next(b for b in listed if b["name"] == name)
        assert mine["health"] == "healthy"
        assert mine["installed"] == ["llama3.2:latest", "qwen2.5:0.5b"]
        assert mine["loaded"] == ["llama3.2:latest"]
        assert (mine["in_flight"], mine["queued"]) == (1, 0)
        assert set(mine) >= {"checked_at", "error"}

        drained = run_cli_json(database_url, "backend", "drain", "--name", name)
        assert drained["state"] == "draining"
        in_process = CliRunner()
        cli_env = {"NZ_DATABASE_URL": database_url, **env}
        text = in_process.invoke(app, ["backend", "list"], env=cli_env).stdout
        assert any(line.startswith(name) and "draining" in line for line in text.splitlines())
        assert run_cli_json(database_url, "backend", "enable", "--name", name)["state"] == "active"

        again = ["backend", "add", "--name", name, "--url", "http://h:1", "--slots", "1"]
        duplicate = in_process.invoke(app, again, env=cli_env)
        assert duplicate.exit_code == 1
        assert duplicate.stderr.strip() == f"error: backend {name!r} already exists"
    finally:
        run_cli(database_url, "backend", "remove", "--name", name)
    gone = CliRunner().invoke(
        app, ["backend", "drain", "--name", name], env={"NZ_DATABASE_URL": database_url}
    )
    assert (gone.exit_code, gone.stderr.strip()) == (1, f"error: unknown backend {name!r}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "ftp://h:1", "--slots", "1"], "http:// or https://"),
        (["--url", "http://h:1", "--slots", "0"], "slots must be between 1 and 4096"),
    ],
)
def test_bad_backend_input_is_one_line(database_url: str, args: list[str], message: str) -> None:
    # in process (the subprocess contract is the test above): a CLI start costs seconds here
    result = CliRunner().invoke(
        app, ["backend", "add", "--name", "x", *args], env={"NZ_DATABASE_URL": database_url}
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_store_rejects_what_the_cli_would(store: Store) -> None:
    name = unique("b")
    with pytest.raises(InvalidInput, match="weight"):
        BackendSpec.checked(name, "http://h:1", 1, weight=0)
    with pytest.raises(InvalidInput, match="not a valid URL"):
        BackendSpec.checked(name, "http://h:99999", 1)
    await store.add_backend(BackendSpec.checked(name, "http://h:1", 1))
    try:
        with pytest.raises(Conflict):
            await store.add_backend(BackendSpec.checked(name, "http://h:2", 1))
    finally:
        await store.remove_backend(name)
    with pytest.raises(NotFound):
        await store.set_backend_state(name, BackendState.DRAINING)


async def test_every_backend_change_notifies_nz_backend_events(
    database_url: str, store: Store
) -> None:
    events: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    await conn.add_listener("nz_backend_events", lambda *a: events.put_nowait(a[-1]))
    key_events: list[str] = []
    await conn.add_listener("nz_key_events", lambda *a: key_events.append(a[-1]))
    name = unique("n")
    try:
        await store.add_backend(BackendSpec.checked(name, "http://h:1", 2))
        await store.set_backend_state(name, BackendState.DRAINING)
        await store.remove_backend(name)
        got = [await asyncio.wait_for(events.get(), 5) for _ in range(3)]
        assert got == [f"backend:{name}"] * 3
        # nothing on the key channel: the auth replicas must not evict their keys for it
        assert not [e for e in key_events if e.startswith("backend")]
    finally:
        await conn.close()


def test_tenant_weight(database_url: str) -> None:
    name = unique("weighted")
    created = run_cli_json(database_url, "create-tenant", "--name", name, "--weight", "3")
    assert created["weight"] == 3
    changed = run_cli_json(
        database_url, "set-limits", "--tenant", name, "--weight", "5", "--rpm", "10"
    )
    assert (changed["weight"], changed["rpm"]) == (5, 10)
    cleared = run_cli_json(database_url, "set-limits", "--tenant", name, "--clear", "weight")
    assert cleared["weight"] is None and cleared["rpm"] == 10
    env = {"NZ_DATABASE_URL": database_url}
    bad = CliRunner().invoke(app, ["set-limits", "--tenant", name, "--weight", "0"], env=env)
    assert bad.exit_code == 1 and "weight must be between 1 and 1000" in bad.stderr
    on_key = CliRunner().invoke(app, ["set-limits", "--prefix", "nz_abcdefgh", "--weight", "2"])
    assert on_key.exit_code == 1 and "tenant's setting" in on_key.stderr
