"""The proxy trusts nothing unsigned, forwards only what it checked, and refuses in dialect."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}

pytest_plugins = ["tests.support.proxy_fixtures"]


def _expired() -> str:
    return signed("chat", expires_at_ms=int(time.time() * 1000) - 1)


def _forged() -> str:
    return signed("chat", secret="another-secret-" + "y" * 40)


def _tampered() -> str:
    version, payload, mac = signed("chat").split(".")
    return f"{version}.{payload[:-2]}AA.{mac}"


@pytest.mark.parametrize(
    "token",
    [None, "", "garbage", "v1.e30.AAAA", "expired", "forged", "tampered", "wrong-route"],
)
def test_unverified_identity_is_401_and_never_reaches_ollama(
    proxy: ProxyServer, sim: SimulatorServer, token: str | None
) -> None:
    makers = {
        "expired": _expired,
        "forged": _forged,
        "tampered": _tampered,
        "wrong-route": lambda: signed("generate"),  # valid, but issued for another route
    }
    value = makers[token]() if token in makers else token
    headers = {} if value is None else {IDENTITY_HEADER: value}
    native = httpx.post(f"{proxy.url}/api/chat", json=CHAT, headers=headers)
    openai = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers)
    assert native.status_code == 401
    assert native.json() == {"error": "invalid or missing gateway identity"}
    assert openai.status_code == 401
    assert openai.json()["error"]["code"] == "invalid_api_key"
    assert sim.requests() == []


def test_forwards_only_its_own_headers_to_the_fixed_path(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    token = signed("chat")
    reply = httpx.post(
        f"{proxy.url}/api/chat",
        json={**CHAT, "stream": False},
        headers={
            IDENTITY_HEADER: token,
            "authorization": "Bearer nz_secretkey",
            "host": "evil.example",
            "cookie": "session=1",
            "x-forwarded-for": "10.0.0.1",
            "x-nz-tenant": "1",
        },
    )
    assert reply.status_code == 200, reply.text
    (seen,) = sim.forwarded()
    assert seen["path"] == "/api/chat"
    headers = seen["headers"]
    assert "authorization" not in headers
    assert not any(name.startswith("x-nz-") for name in headers)
    assert "cookie" not in headers
    assert "x-forwarded-for" not in headers
    assert headers["host"] == f"127.0.0.1:{sim.port}"
    assert headers["x-request-id"] == reply.headers["x-request-id"]
    assert token not in str(headers)


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": []}', "'model' is required"),
        (b'{"model": 7, "messages": []}', "'model' is required"),
        # Go's decoder matches keys case-insensitively: "Model" would win upstream
        (b'{"model": "llama3.2", "Model": "secret-model", "messages": []}', "unknown field"),
    ],
)
def test_malformed_native_bodies_are_400_in_the_native_dialect(
    proxy: ProxyServer, sim: SimulatorServer, body: bytes, message_part: str
) -> None:
    reply = httpx.post(
        f"{proxy.url}/api/chat",
        content=body,
        headers={IDENTITY_HEADER: signed("chat"), "content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert message_part in reply.json()["error"]
    assert sim.forwarded() == []


def test_malformed_openai_body_is_400_in_openai_shape(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    reply = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}]},
        headers={IDENTITY_HEADER: signed("v1.chat.completions")},
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "model" in error["message"]
    assert sim.forwarded() == []


async def test_oversized_body_is_413_and_nothing_is_forwarded(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    ids = new_ids()
    request_id = f"req-big-{ids['key_id']}"
    token = signed("chat", request_id=request_id, **ids)
    declared = 8 * 1024 * 1024 + 1  # one byte over the default NZ_MAX_BODY_BYTES
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        (
            f"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {declared}\r\n{IDENTITY_HEADER}: {token}\r\n\r\n"
        ).encode()
        + b'{"model": "llama3.2", "messages": ['
    )
    await writer.drain()
    # The proxy reads and drops a refused body before it answers (so that Caddy,
    # in front, relays the 413 instead of a reset turned 503): send all of it.
    writer.write(b" " * (declared - len(b'{"model": "llama3.2", "messages": [')))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    rest = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")
    assert b"exceeds" in rest
    assert sim.forwarded() == []
    rows = await wait_audit_rows(store, [request_id])
    assert rows[request_id]["status"] == 413


def test_wrong_method_is_405_in_dialect(proxy: ProxyServer, sim: SimulatorServer) -> None:
    reply = httpx.get(f"{proxy.url}/api/chat", headers={IDENTITY_HEADER: signed("chat")})
    assert reply.status_code == 405
    assert "error" in reply.json()
    assert sim.requests() == []


def test_health_ready_and_metrics(proxy: ProxyServer, sim: SimulatorServer) -> None:
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": True, "postgres": True, "ollama": True}
    httpx.post(
        f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: signed("chat")}
    ).raise_for_status()
    text = httpx.get(f"{proxy.url}/metrics").text
    assert 'nz_proxy_requests_total{route="chat",status="200"}' in text
    assert 'nz_proxy_tokens_total{kind="completion"}' in text
    assert "nz_proxy_ttfb_seconds_bucket" in text
    assert "nz_proxy_audit_queue_depth" in text
    assert "nz_proxy_audit_spool_files" in text
