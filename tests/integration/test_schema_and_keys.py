"""Issue 2 on real Postgres: migrations, key storage, revoke/rotate, policy resolution."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.keys import parse_key
from neuronetz_gateway.domain.policy import PolicySettings, resolve_policy
from tests.conftest import unique
from tests.support.cli import run_cli, run_cli_json


async def _fresh_database(admin_url: str) -> tuple[str, str]:
    name = unique("nz_test_migrate").replace("-", "_")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, admin_url.rsplit("/", 1)[0] + "/" + name


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _schema_snapshot(url: str) -> list[tuple[str, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY 1, 2"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )
        triggers = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"
        )
    finally:
        await conn.close()
    return (
        [tuple(r.values()) for r in rows]
        + [tuple(r.values()) for r in indexes]
        + [tuple(r.values()) for r in triggers]
    )


async def test_migrate_twice_is_a_no_op(pg_admin_url: str) -> None:
    name, url = await _fresh_database(pg_admin_url)
    try:
        first = await asyncio.to_thread(run_cli, url, "migrate")
        assert "applied 7 migration(s)" in first.stdout
        after_first = await _schema_snapshot(url)
        second = await asyncio.to_thread(run_cli, url, "migrate")
        assert "schema up to date" in second.stdout
        assert await _schema_snapshot(url) == after_first
        assert any("api_key_changed" in str(r) for r in after_first)
        assert any("usage_log_tenant_ts_idx" in str(r) for r in after_first)
        assert any("prompt_log_request_id_uq" in str(r) for r in after_first)
        assert any("api_key_fingerprint_follows_hash" in str(r) for r in after_first)
        assert any("backend_changed" in str(r) for r in after_first)
    finally:
        await _drop(pg_admin_url, name)


async def test_created_key_round_trips_and_is_stored_only_hashed(
    database_url: str, store: Store
) -> None:
    tenant = unique("acme")
    await asyncio.to_thread(run_cli, database_url, "create-tenant", "--name", tenant)
    created = await asyncio.to_thread(
        run_cli_json, database_url, "create-key", "--tenant", tenant, "--name", "prod-1"
    )
    assert set(created) == {"key", "prefix", "tenant", "name"}
    parsed = parse_key(created["key"])
    assert parsed.prefix == created["prefix"]
    assert created["tenant"] == tenant and created["name"] == "prod-1"

    record = await store.find_key_for_auth(parsed.prefix)
    assert record is not None
    assert record.secret_hash.startswith("$argon2id$")
    assert KeyHasher().verify_blocking(record.secret_hash, created["key"])
    assert not KeyHasher().verify_blocking(record.secret_hash, created["key"][:-1] + "x")

    # The secret is nowhere in the database in clear: dump everything.
    dump = (
        await asyncio.to_thread(
            subprocess.run,
            ["pg_dump", "--data-only", database_url],
            capture_output=True,
            text=True,
            check=True,
        )
    ).stdout
    assert created["prefix"] in dump
    assert created["key"] not in dump
    assert created["key"][11:43] not in dump  # the secret part alone


async def test_revoke_and_rotate_change_verification_and_notify(
    database_url: str, store: Store
) -> None:
    tenant = unique("acme")
    await asyncio.to_thread(run_cli, database_url, "create-tenant", "--name", tenant)
    created = await asyncio.to_thread(
        run_cli_json, database_url, "create-key", "--tenant", tenant, "--name", "k"
    )
    prefix = created["prefix"]
    hasher = KeyHasher()

    events: asyncio.Queue[str] = asyncio.Queue()

    def on_event(*args: object) -> None:
        payload = str(args[3])
        if not payload.startswith("ping:"):  # running auth replicas measure lag on the channel
            events.put_nowait(payload)

    listener = await asyncpg.connect(database_url)
    await listener.add_listener("nz_key_events", on_event)
    try:
        rotated = await asyncio.to_thread(
            run_cli_json, database_url, "rotate-key", "--prefix", prefix, "--grace-seconds", "60"
        )
        assert await asyncio.wait_for(events.get(), 5) == f"key:{prefix}"
        assert rotated["prefix"] == prefix and rotated["key"] != created["key"]
        assert rotated["previous_valid_until"] is not None
        record = await store.find_key_for_auth(prefix)
        assert record is not None and record.previous_hash is not None
        assert hasher.verify_blocking(record.secret_hash, rotated["key"])
        assert not hasher.verify_blocking(record.secret_hash, created["key"])
        assert hasher.verify_blocking(record.previous_hash, created["key"])

        # Rotating without grace drops the old secret at once.
        again = await asyncio.to_thread(
            run_cli_json, database_url, "rotate-key", "--prefix", prefix
        )
        assert await asyncio.wait_for(events.get(), 5) == f"key:{prefix}"
        record = await store.find_key_for_auth(prefix)
        assert record is not None and record.previous_hash is None
        assert hasher.verify_blocking(record.secret_hash, again["key"])

        await asyncio.to_thread(run_cli, database_url, "revoke-key", "--prefix", prefix)
        assert await asyncio.wait_for(events.get(), 5) == f"key:{prefix}"
        record = await store.find_key_for_auth(prefix)
        assert record is not None and record.key.revoked_at is not None
        listed = await asyncio.to_thread(
            run_cli_json, database_url, "list-keys", "--tenant", tenant
        )
        assert listed[0]["status"] == "revoked"

        await asyncio.to_thread(
            run_cli, database_url, "set-limits", "--tenant", tenant, "--rpm", "5"
        )
        tenant_id = (await store.get_tenant(tenant)).id
        assert await asyncio.wait_for(events.get(), 5) == f"tenant:{tenant_id}"
    finally:
        await listener.close()


async def test_limits_and_models_resolve_tenant_to_key(database_url: str, store: Store) -> None:
    tenant = unique("acme")
    await asyncio.to_thread(
        run_cli,
        database_url,
        "create-tenant",
        "--name",
        tenant,
        "--rpm",
        "100",
        "--tpm",
        "5000",
        "--daily-tokens",
        "10000",
        "--models",
        "llama3.2,qwen2.5:0.5b",
        "--max-num-ctx",
        "8192",
    )
    created = await asyncio.to_thread(
        run_cli_json,
        database_url,
        "create-key",
        "--tenant",
        tenant,
        "--name",
        "narrow",
        "--rpm",
        "10",
        "--models",
        "qwen2.5:0.5b,mistral",
        "--monthly-tokens",
        "900",
    )
    record = await store.find_key_for_auth(created["prefix"])
    assert record is not None
    resolved = resolve_policy(record.tenant.policy, record.key.policy)
    assert resolved.key_limits.rpm == 10
    assert resolved.key_limits.tpm == 5000
    assert resolved.key_limits.daily_tokens == 10000
    assert resolved.key_limits.monthly_tokens == 900
    assert resolved.tenant_limits.rpm == 100
    assert resolved.tenant_limits.monthly_tokens is None
    assert resolved.models == ("qwen2.5:0.5b",)
    assert resolved.caps.max_num_ctx == 8192

    # Clearing the key's overrides returns it to the tenant's values.
    await asyncio.to_thread(
        run_cli, database_url, "set-limits", "--prefix", created["prefix"], "--clear", "rpm,models"
    )
    record = await store.find_key_for_auth(created["prefix"])
    assert record is not None
    assert record.key.policy == PolicySettings(monthly_tokens=900)
    resolved = resolve_policy(record.tenant.policy, record.key.policy)
    assert resolved.key_limits.rpm == 100
    assert resolved.models == ("llama3.2:latest", "qwen2.5:0.5b")


async def test_cli_json_matches_the_database(database_url: str, store: Store) -> None:
    tenant = unique("acme")
    made = await asyncio.to_thread(
        run_cli_json, database_url, "create-tenant", "--name", tenant, "--concurrency", "3"
    )
    row = await store.pool.fetchrow("SELECT * FROM tenant WHERE name = $1", tenant)
    assert row is not None and made["id"] == row["id"] and made["concurrency"] == 3
    keys = [
        await asyncio.to_thread(
            run_cli_json,
            database_url,
            "create-key",
            "--tenant",
            tenant,
            "--name",
            f"k{i}",
            "--expires-in-days",
            "7",
            "--log-prompts",
            "--prompt-ttl-days",
            "3",
        )
        for i in range(2)
    ]
    listed = await asyncio.to_thread(run_cli_json, database_url, "list-keys", "--tenant", tenant)
    rows = await store.pool.fetch(
        "SELECT prefix, name, log_prompts, prompt_ttl_days, expires_at FROM api_key"
        " WHERE tenant = $1 ORDER BY id",
        made["id"],
    )
    assert (
        [k["prefix"] for k in listed] == [r["prefix"] for r in rows] == [k["prefix"] for k in keys]
    )
    for item, db in zip(listed, rows, strict=True):
        assert item["name"] == db["name"]
        assert item["log_prompts"] is True and item["prompt_ttl_days"] == 3
        assert item["expires_at"] == db["expires_at"].isoformat()
        assert "key" not in item and "secret_hash" not in item
        assert all("argon2" not in str(v) for v in item.values())

    tenant_id, key_id = made["id"], (await store.get_key(keys[0]["prefix"])).id
    await store.pool.executemany(
        "INSERT INTO usage_log (request_id, tenant_id, key_id, key_prefix, route, model, status,"
        " prompt_tokens, completion_tokens, duration_ms) VALUES ($1, $2, $3, $4, 'chat',"
        " 'llama3.2:latest', 200, $5, $6, 12)",
        [(unique("req"), tenant_id, key_id, keys[0]["prefix"], 10 + i, 5) for i in range(3)],
    )
    usage = await asyncio.to_thread(run_cli_json, database_url, "usage", "--tenant", tenant)
    assert usage["requests"] == 3
    assert usage["prompt_tokens"] == 33 and usage["completion_tokens"] == 15
    assert usage["total_tokens"] == 48
    only_other = await asyncio.to_thread(
        run_cli_json, database_url, "usage", "--tenant", tenant, "--prefix", keys[1]["prefix"]
    )
    assert only_other["requests"] == 0
    future = await asyncio.to_thread(
        run_cli_json, database_url, "usage", "--tenant", tenant, "--since", "2999-01-01"
    )
    assert future["requests"] == 0
    audit = await asyncio.to_thread(
        run_cli_json, database_url, "audit", "--tenant", tenant, "--limit", "2"
    )
    assert len(audit) == 2
    assert {a["prompt_tokens"] for a in audit} <= {10, 11, 12}
    assert all(a["key_prefix"] == keys[0]["prefix"] for a in audit)
    assert all(a["revoked"] is False for a in audit)  # migration m0004's column
