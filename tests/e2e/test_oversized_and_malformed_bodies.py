"""Through real Caddy at its production body limit: too large is a 413, malformed is a 400.

Never a 503 with ``Retry-After``: a client would retry what can never succeed.
The stack's own Caddy runs with a 1 MB limit; these tests start a second one
on the repository's Caddyfile with its default (16 MB), so a 9 MB body passes
Caddy and is refused by the proxy (8 MB), and a 17 MB body is refused by Caddy.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_clear, sim_requests
from tests.e2e.test_edge_security import extra_caddy

pytestmark = pytest.mark.e2e

MB = 1024 * 1024


def _body(size: int) -> bytes:
    head = b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"'
    tail = b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def _chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_oversized_bodies_are_413_in_the_dialect_never_503(
    e2e_stack: E2EStack, ledger: Ledger, tmp_path: Path
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}", "Content-Type": "application/json"}
    proxies = [u.removeprefix("http://") for u in e2e_stack.proxy_urls]
    auths = [u.removeprefix("http://") for u in e2e_stack.auth_urls]
    outcomes: dict[str, list[int]] = {}
    sim_clear(e2e_stack)
    with extra_caddy(e2e_stack, tmp_path, auth=auths, proxy=proxies) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for size in (9 * MB, 17 * MB):
                data = _body(size)
                for path in ("/api/chat", "/v1/chat/completions"):
                    for framing in ("length", "chunked"):
                        statuses = outcomes.setdefault(f"{path} {size // MB}MB {framing}", [])
                        for _ in range(3):
                            content = data if framing == "length" else _chunks(data)
                            try:
                                answer = await client.post(path, content=content, headers=auth)
                            except httpx.TransportError:
                                statuses.append(0)  # no answer at all: a reset
                                continue
                            statuses.append(answer.status_code)
                            assert "retry-after" not in answer.headers, (path, size, framing)
                            if answer.status_code == 413:
                                error = answer.json()["error"]
                                if path.startswith("/v1/"):
                                    assert error["code"] == "request_too_large"
                                else:
                                    assert isinstance(error, str)
        # a new connection: one Caddy closed after a refused body may still sit in the pool
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            after = await client.post("/api/chat", content=_body(1000), headers=auth)
    # Past the proxy's limit (9 MB): always the 413. Past Caddy's own (17 MB) Caddy
    # answers 413 and closes while the client still sends: the client may see a
    # reset instead (0 here; a known gap, scope-docs 6b), but never a 503.
    assert {k: v for k, v in outcomes.items() if "9MB" in k and set(v) != {413}} == {}
    assert {k: v for k, v in outcomes.items() if not set(v) <= {413, 0}} == {}
    assert after.status_code == 200
    chats = [r for r in sim_requests(e2e_stack) if r["path"] == "/api/chat"]
    assert len(chats) == 1


MALFORMED_CHUNKED = {
    "non-hex size": b"zz\r\nabc\r\n0\r\n\r\n",
    "overflowing size": b"fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "negative size": b"-3\r\nabc\r\n0\r\n\r\n",
    "size shorter than data": b"2\r\nabcdef\r\n0\r\n\r\n",
    "missing CRLF after data": b"3\r\nabcXX0\r\n\r\n",
    "bare LF line": b"3\nabc\n0\n\n",
}


def _raw(url: str, head: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(head.encode("latin-1") + body)
        received = []
        while chunk := sock.recv(65536):
            received.append(chunk)
    return b"".join(received)


async def test_malformed_chunk_sizes_are_400_never_503(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue()
    parts = urlsplit(e2e_stack.url)
    outcomes = {}
    for path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
        for name, body in MALFORMED_CHUNKED.items():
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                f"Authorization: Bearer {caller.key}\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            reply = _raw(e2e_stack.url, head, body)
            status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
            outcomes[f"{path} {name}"] = status_line
            assert b"retry-after" not in reply.lower(), (path, name, reply[:400])
            _, _, payload = reply.partition(b"\r\n\r\n")
            if " 400 " in status_line:
                error = json.loads(payload)["error"]
                expected = dict if path.startswith("/v1/") else str
                assert isinstance(error, expected), (path, name, payload)
    assert {k: v for k, v in outcomes.items() if " 400 " not in v + " "} == {}
