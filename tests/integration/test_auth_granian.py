"""The auth service for real: ``neuronetz-gateway serve auth`` under Granian, over TCP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.identity import IDENTITY_HEADER, verify_identity
from tests.conftest import TEST_SECRET
from tests.integration.auth_helpers import make_key
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "neuronetz-gateway")


@pytest.fixture
def served_auth(database_url: str, redis_test_url: str, redis_prefix: str) -> Iterator[str]:
    """``serve auth`` in a subprocess; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "NZ_DATABASE_URL": database_url,
        "NZ_REDIS_URL": redis_test_url,
        "NZ_REDIS_PREFIX": redis_prefix,
        "NZ_GATEWAY_SECRET": TEST_SECRET,
        "NZ_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [CLI, "serve", "auth", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve auth did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


async def test_serve_auth_under_granian_decides(served_auth: str, store: Store) -> None:
    made = await make_key(store, hasher=KeyHasher())
    async with httpx.AsyncClient(base_url=served_auth, timeout=5) as client:

        async def call(key: str, uri: str, method: str = "POST") -> httpx.Response:
            return await client.get(
                "/authorize",
                headers={
                    "authorization": f"Bearer {key}",
                    "x-forwarded-method": method,
                    "x-forwarded-uri": uri,
                },
            )

        ok = await call(made.full, "/api/generate")
        assert ok.status_code == 200, ok.text
        identity = verify_identity(
            ok.headers[IDENTITY_HEADER], TEST_SECRET.encode(), int(time.time() * 1000)
        )
        assert identity.route == "generate"
        assert identity.key_prefix == made.record.prefix
        answers = await asyncio.gather(*(call(made.full, "/v1/models", "GET") for _ in range(20)))
        assert {a.status_code for a in answers} == {200}
        assert (await call(made.full, "/api/pull")).status_code == 403
        assert (await call(made.full, "/api/%70ull")).status_code == 403
        assert (await call(made.full, "/api/me")).status_code == 404
        assert (await call(made.full, "/api/chat", "GET")).status_code == 405
        assert (await call(made.full[:-2] + "zz", "/api/chat")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'nz_auth_decisions_total{outcome="allowed",reason="ok"} 21.0' in metrics
    assert "nz_auth_key_listener_up 1.0" in metrics


async def test_serve_auth_answers_on_every_open_connection(served_auth: str) -> None:
    """Caddy's forward_auth keeps a pool of keep-alive connections to each replica and
    opens more under load; every one must be served. Granian's ``backpressure`` caps
    a worker's open connections (idle ones included), so any value below what Caddy
    may hold would leave requests without an answer until an idle connection closes:
    ``serve auth`` must leave it unset (Granian's default: the backlog, 2048)."""
    host, port = served_auth.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    opened: list[asyncio.StreamWriter] = []
    try:
        for _ in range(100):  # each answered, then left open (idle) beside the next
            reader, writer = await asyncio.open_connection(host, int(port))
            opened.append(writer)
            writer.write(request)
            async with asyncio.timeout(2):
                status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
    finally:
        for writer in opened:
            writer.close()
