"""Prompt text is stored only for keys that opted in, and expires."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.simulator import simulated_text
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import eventually, new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer, running_proxy

pytest_plugins = ["tests.support.proxy_fixtures"]


@pytest.fixture(scope="module")
def proxy(
    simulator: SimulatorServer, database_url: str, redis_test_url: str, redis_prefix: str
) -> Iterator[ProxyServer]:
    with running_proxy(
        database_url=database_url,
        redis_url=redis_test_url,
        redis_prefix=redis_prefix + "p",
        ollama_url=simulator.url,
        NZ_PROMPT_PURGE_INTERVAL_SECONDS="0.2",
        NZ_LOG_LEVEL="debug",
    ) as server:
        yield server


def _requests(proxy: ProxyServer, text: str, **identity: object) -> list[str]:
    request_ids = []
    for route, path, body in (
        ("chat", "/api/chat", {"messages": [{"role": "user", "content": text}]}),
        ("generate", "/api/generate", {"prompt": text, "stream": False}),
        (
            "v1.chat.completions",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": text}], "stream": True},
        ),
        ("v1.embeddings", "/v1/embeddings", {"input": text}),
    ):
        request_id = f"req-{secrets.token_hex(6)}"
        model = "nomic-embed-text" if "embed" in route else "llama3.2"
        reply = httpx.post(
            f"{proxy.url}{path}",
            json={"model": model, **body},
            headers={IDENTITY_HEADER: signed(route, request_id=request_id, **identity)},
        )
        assert reply.status_code == 200, reply.text
        request_ids.append(request_id)
    return request_ids


async def test_no_prompt_text_anywhere_for_a_key_without_logging(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    canary = f"canary{secrets.token_hex(8)}"
    request_ids = _requests(proxy, f"please remember {canary} now", **new_ids())
    await wait_audit_rows(store, request_ids)
    await asyncio.sleep(0.2)  # the log lines are written after the response
    async with store.pool.acquire() as conn:
        for table in ("usage_log", "prompt_log", "api_key", "tenant"):
            found = await conn.fetchval(
                f"SELECT count(*) FROM {table} t WHERE t::text LIKE '%' || $1 || '%'",
                canary,
            )
            assert found == 0, table
    assert canary not in proxy.log.read_text()
    assert canary not in "".join(p.read_text() for p in proxy.spool.rglob("*") if p.is_file())


async def test_opted_in_key_stores_request_and_answer_until_expiry(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    canary = f"canary{secrets.token_hex(8)}"
    ids = new_ids()
    request_ids = _requests(proxy, f"log {canary}", log_prompts=True, prompt_ttl_days=7, **ids)
    await wait_audit_rows(store, request_ids)

    async def written() -> bool:
        return bool(
            await store.pool.fetchval(
                "SELECT count(*) FROM prompt_log WHERE request_id = ANY($1::text[])", request_ids
            )
            == 4
        )

    assert await eventually(written)
    rows = await store.pool.fetch(
        "SELECT * FROM prompt_log WHERE request_id = ANY($1::text[])", request_ids
    )
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == set(request_ids)
    now = datetime.now(UTC)
    for request_id in request_ids:
        row = by_id[request_id]
        assert canary in row["request_text"]
        assert row["key_id"] == ids["key_id"]
        assert timedelta(days=6, hours=23) < row["expires_at"] - now <= timedelta(days=7)
    assert by_id[request_ids[0]]["response_text"] == simulated_text(20)
    assert by_id[request_ids[2]]["response_text"] == simulated_text(20)
    assert canary not in proxy.log.read_text()


async def test_expired_prompt_logs_are_purged_by_the_proxy(
    proxy: ProxyServer, store: Store
) -> None:
    request_id = f"req-old-{secrets.token_hex(4)}"
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.pool.execute(
        "INSERT INTO prompt_log (request_id, tenant_id, key_id, created_at, expires_at,"
        " request_text, response_text) VALUES ($1, 1, 1, $2, $2, 'x', 'y')",
        request_id,
        past,
    )

    async def purged() -> bool:
        return bool(
            await store.pool.fetchval(
                "SELECT count(*) FROM prompt_log WHERE request_id = $1", request_id
            )
            == 0
        )

    assert await eventually(purged)
