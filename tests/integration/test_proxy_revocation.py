"""Revoking a key ends its running requests at the proxy: the surface's error, charged, audited.

The proxy LISTENs on ``nz_key_events``; a key event for a running request
makes it ask Postgres whether that key is revoked, and only then cut the
upstream. Keys are real rows (the test database), identities are signed
here as auth would sign them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec
import pytest

from neuronetz_gateway.adapters.postgres.store import KeyRecord, Store
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from tests.conftest import unique
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import eventually, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "tell me a story"}]}
REVOKED = "the API key was revoked"

pytest_plugins = ["tests.support.proxy_fixtures"]


async def _new_key(store: Store, tenant: str | None = None) -> KeyRecord:
    if tenant is None:
        tenant = unique("revoc")
        await store.create_tenant(tenant, PolicySettings())
    key = generate_key()
    return await store.create_key(
        tenant_name=tenant,
        name=unique("key"),
        prefix=key.prefix,
        secret_hash="$argon2id$unused-here",
        policy=PolicySettings(),
        expires_at=None,
        log_prompts=False,
        prompt_ttl_days=None,
    )


def _token(route: str, key: KeyRecord, request_id: str) -> str:
    return signed(
        route,
        request_id=request_id,
        tenant_id=key.tenant_id,
        tenant_name=key.tenant_name,
        key_id=key.id,
        key_prefix=key.prefix,
    )


@pytest.fixture
def slow(sim: SimulatorServer) -> SimulatorServer:
    sim.configure(chunks=200, chunk_delay_ms=50)  # ten seconds of answer
    return sim


async def _stream_until_revoked(
    proxy: ProxyServer, path: str, body: dict[str, Any], token: str, revoke: Any
) -> tuple[list[str], float]:
    """Stream; revoke after three lines; the lines and seconds from revocation to the end."""
    lines: list[str] = []
    revoked_at = 0.0
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream(
            "POST", f"{proxy.url}{path}", json=body, headers={IDENTITY_HEADER: token}
        ) as reply,
    ):
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                await revoke()
                revoked_at = time.monotonic()
    return lines, time.monotonic() - revoked_at


async def test_revoking_a_key_ends_its_native_stream_charges_and_audits(
    proxy: ProxyServer, slow: SimulatorServer, store: Store
) -> None:
    key = await _new_key(store)
    request_id = f"req-revoke-{key.id}"
    lines, took = await _stream_until_revoked(
        proxy,
        "/api/chat",
        CHAT,
        _token("chat", key, request_id),
        lambda: store.revoke_key(key.prefix),
    )
    assert took < 1.0, f"the stream ran {took:.2f}s after revocation"
    assert msgspec.json.decode(lines[-1]) == {"error": REVOKED}
    assert len(lines) < 100
    assert await eventually(lambda: slow.stats()["cancelled"] >= 1)
    assert slow.stats()["completed"] == 0
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["revoked"] is True
    assert row["status"] == 401
    assert row["streamed"] is True
    assert row["completion_tokens"] >= 2  # the chunks that were sent are charged
    assert row["prompt_tokens"] > 0


async def test_revoking_ends_an_openai_stream_with_its_error_event(
    proxy: ProxyServer, slow: SimulatorServer, store: Store
) -> None:
    key = await _new_key(store)
    request_id = f"req-revoke-sse-{key.id}"
    lines, took = await _stream_until_revoked(
        proxy,
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        _token("v1.chat.completions", key, request_id),
        lambda: store.revoke_key(key.prefix),
    )
    assert took < 1.0
    error = msgspec.json.decode(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "invalid_api_key"
    assert error["message"] == REVOKED
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["revoked"] is True


async def test_a_non_streamed_answer_of_a_revoked_key_is_a_401(
    proxy: ProxyServer, slow: SimulatorServer, store: Store
) -> None:
    key = await _new_key(store)
    request_id = f"req-revoke-whole-{key.id}"
    async with httpx.AsyncClient(timeout=20) as client:
        pending = asyncio.ensure_future(
            client.post(
                f"{proxy.url}/api/chat",
                json={**CHAT, "stream": False},
                headers={IDENTITY_HEADER: _token("chat", key, request_id)},
            )
        )
        assert await eventually(lambda: len(slow.forwarded()) == 1)
        await store.revoke_key(key.prefix)
        revoked_at = time.monotonic()
        reply = await pending
    assert time.monotonic() - revoked_at < 1.0
    assert reply.status_code == 401
    assert reply.json() == {"error": REVOKED}
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["revoked"] is True


async def test_other_key_changes_and_other_keys_leave_streams_running(
    proxy: ProxyServer, slow: SimulatorServer, store: Store
) -> None:
    slow.configure(chunks=30, chunk_delay_ms=40)
    key = await _new_key(store)
    sibling = await _new_key(store, key.tenant_name)
    request_id = f"req-keep-{key.id}"

    async def change_others() -> None:
        await store.update_key_policy(key.prefix, {"rpm": 1000})  # notifies, revokes nothing
        await store.revoke_key(sibling.prefix)  # the same tenant, another key

    lines, _ = await _stream_until_revoked(
        proxy, "/api/chat", CHAT, _token("chat", key, request_id), change_others
    )
    assert msgspec.json.decode(lines[-1])["done"] is True
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["revoked"] is False
    assert row["status"] == 200


async def test_a_request_whose_key_is_revoked_before_it_goes_upstream_never_does(
    proxy: ProxyServer, slow: SimulatorServer, store: Store
) -> None:
    key = await _new_key(store)
    request_id = f"req-early-{key.id}"
    token = _token("chat", key, request_id)
    body = msgspec.json.encode({**CHAT, "stream": False})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    # the headers now, the body only after the revocation has reached the proxy
    writer.write(
        (
            f"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{IDENTITY_HEADER}: {token}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    await store.revoke_key(key.prefix)
    await asyncio.sleep(0.5)
    writer.write(body)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401")
    assert slow.forwarded() == []
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["revoked"] is True
