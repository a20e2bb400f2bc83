"""Through real Caddy: uniform 401s, blocked routes and path tricks, smuggled identities.

Raw sockets where the request line matters: httpx and http.client normalise
or refuse some paths, and a test of path tricks must send them byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from neuronetz_gateway.devstack.processes import ManagedProcess, http_status, wait_until
from neuronetz_gateway.devstack.servers import free_port
from neuronetz_gateway.domain.identity import Identity, sign_identity, verify_identity
from neuronetz_gateway.domain.keys import generate_key
from tests.conftest import TEST_SECRET
from tests.e2e.conftest import IssuedKey, Ledger
from tests.e2e.processes import CADDYFILE, E2EStack, sim_clear, sim_requests

pytestmark = pytest.mark.e2e

CHAT_BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
OPENAI_BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def raw_request(
    stack: E2EStack, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request exactly as written; return status, headers, body."""
    parts = urlsplit(stack.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, rest


@contextlib.contextmanager
def extra_caddy(
    stack: E2EStack,
    tmp_path: Path,
    *,
    auth: list[str],
    proxy: list[str],
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A second Caddy (same version) on the repository's Caddyfile with these upstreams
    (``env``: more of its settings, such as ``NZ_MAX_BODY``)."""
    port = free_port()
    caddy = ManagedProcess(
        f"caddy-{port}",
        [stack.caddy, "run", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
        env={
            "PATH": os.environ["PATH"],
            "NZ_SITE_ADDRESS": f"http://127.0.0.1:{port}",
            "NZ_CADDY_ADMIN": "off",
            "NZ_AUTH_UPSTREAM": " ".join(auth),
            "NZ_PROXY_UPSTREAM": " ".join(proxy),
            "XDG_CONFIG_HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path),
            **(env or {}),
        },
        log_path=tmp_path / f"caddy-{port}.log",
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Caddy answers as soon as it listens (a 401 or, with auth down, a 503).
        wait_until(
            # (with auth down Caddy retries for 2 s before its 503)
            lambda: http_status(url + "/api/tags", timeout=5) in {401, 503},
            what="caddy",
            timeout=20,
            watch=[caddy],
        )
        yield url
    finally:
        caddy.stop()


# ---------------------------------------------------------------- 401s


async def test_every_bad_key_gets_the_same_401(e2e_stack: E2EStack, ledger: Ledger) -> None:
    revoked = await ledger.issue()
    await ledger.store.revoke_key(revoked.prefix)
    valid = generate_key().full
    bad_checksum = valid[:-1] + ("a" if valid[-1] != "a" else "b")
    presented: dict[str, dict[str, str]] = {
        "no header": {},
        "empty bearer": {"Authorization": "Bearer"},
        "garbage bearer": {"Authorization": "Bearer not-a-key"},
        "basic scheme": {"Authorization": f"Basic {valid}"},
        "bad checksum": {"Authorization": f"Bearer {bad_checksum}"},
        "unknown key": {"Authorization": f"Bearer {valid}"},
        "revoked key": {"Authorization": f"Bearer {revoked.key}"},
        "garbage x-api-key": {"x-api-key": "nz_nonsense"},
        "forged identity only": {"X-NZ-Identity": "v1.e30.AAAA"},
    }
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for path, body in (("/api/chat", CHAT_BODY), ("/v1/chat/completions", OPENAI_BODY)):
            answers = {
                name: await client.post(path, json=body, headers=headers)
                for name, headers in presented.items()
            }
            statuses = {name: r.status_code for name, r in answers.items()}
            assert set(statuses.values()) == {401}, statuses
            bodies = {r.content for r in answers.values()}
            assert len(bodies) == 1, {name: r.content for name, r in answers.items()}
            error = json.loads(bodies.pop())["error"]
            if path.startswith("/v1/"):
                assert error["code"] == "invalid_api_key"
            else:
                assert isinstance(error, str)
    assert sim_requests(e2e_stack) == []


# ---------------------------------------------------------------- blocked routes, path tricks

PATH_TRICKS = [
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/sha256:0000"),
    ("HEAD", "/api/blobs/sha256:0000"),
    ("POST", "/API/PULL"),
    ("POST", "/api/Pull"),
    ("POST", "/api//pull"),
    ("POST", "//api/pull"),
    ("POST", "/api/./pull"),
    ("POST", "/api/chat/../pull"),
    ("POST", "/api/chat/%2e%2e/pull"),
    ("POST", "/api/chat%2f..%2fpull"),
    ("POST", "/v1/../api/pull"),
    ("POST", "/api/%70ull"),
    ("POST", "/api/%2570ull"),
    ("POST", "/api%2fpull"),
    ("POST", "/api/pull/"),
    ("POST", "/api/pull;x=1"),
    ("POST", "/api/pull."),
    ("POST", "/api/pull%00"),
    ("POST", "/api\\pull"),
    ("POST", "/api/p%C3%BAll"),
    ("POST", "/api/chat?x=/api/pull"),
    ("POST", "/api/chat/"),
    ("POST", "/api/CHAT"),
    ("POST", "/%61pi/chat"),
    ("GET", "/metrics"),
    ("GET", "/_sim/requests"),
    ("GET", "/authorize"),
    ("POST", "http://127.0.0.1:11434/api/pull"),
]


async def test_blocked_routes_and_path_tricks_never_reach_ollama(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    headers = {"Authorization": f"Bearer {caller.key}", "Content-Type": "application/json"}
    body = json.dumps({"model": "llama3.2", "name": "llama3.2", **CHAT_BODY}).encode()
    sim_clear(e2e_stack)
    outcomes = {}
    for method, target in PATH_TRICKS:
        status, _, _ = raw_request(e2e_stack, method, target, headers, body)
        outcomes[f"{method} {target}"] = status
    refused = {400, 403, 404, 405}
    assert {t: s for t, s in outcomes.items() if s not in refused} == {}
    for target in ("/api/pull", "/api/delete", "/api//pull", "/api/chat/../pull"):
        assert outcomes[f"{'DELETE' if 'delete' in target else 'POST'} {target}"] == 403
    assert sim_requests(e2e_stack) == []
    # The same key still works on the canonical route: nothing above was a key problem.
    status, _, _ = raw_request(e2e_stack, "POST", "/api/chat", headers, body)
    assert status == 200


# ---------------------------------------------------------------- smuggled identities

IDENTITY_HEADER_SPELLINGS = [
    "X-NZ-Identity",
    "x-nz-identity",
    "X-NZ-IDENTITY",
    "X-Nz-Identity",
    "X_NZ_Identity",
    "x_nz_identity",
    "X-NZ_Identity",
    "X_NZ-Identity",
]


def _identity_for(victim_tenant_id: int, victim_key_id: int, victim: IssuedKey) -> Identity:
    return Identity(
        request_id="smuggled-" + victim.prefix,
        tenant_id=victim_tenant_id,
        tenant_name=victim.tenant,
        key_id=victim_key_id,
        key_prefix=victim.prefix,
        route="chat",
        expires_at_ms=int(time.time() * 1000) + 30_000,
    )


async def test_client_identity_headers_never_change_who_is_charged(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    victim = await ledger.issue()
    attacker = await ledger.issue()
    record = await ledger.store.get_key(victim.prefix)
    identity = _identity_for(record.tenant_id, record.id, victim)
    # A token signed with the real secret stands for one replayed from another
    # tenant's request within its TTL; a forged one is signed with a guess.
    tokens = {
        "validly signed for the victim": sign_identity(identity, TEST_SECRET.encode()),
        "forged": sign_identity(identity, b"guessed-secret-" + b"y" * 40),
    }
    # A body of this test's own: the shared simulator may still receive a request an
    # earlier test left in flight after sim_clear, and only ours are counted below.
    marker = f"edge-identity-{secrets.token_hex(6)}"
    chat = json.dumps(
        {"model": "llama3.2", "messages": [{"role": "user", "content": marker}], "stream": False}
    ).encode()
    sim_clear(e2e_stack)
    sent = 0
    for label, token in tokens.items():
        every_spelling = dict.fromkeys(IDENTITY_HEADER_SPELLINGS, token)
        for name in IDENTITY_HEADER_SPELLINGS:
            status, _, body = raw_request(
                e2e_stack,
                "POST",
                "/api/chat",
                {"Authorization": f"Bearer {attacker.key}", name: token},
                chat,
            )
            assert status == 200, (label, name, body)
            sent += 1
        status, _, _ = raw_request(
            e2e_stack,
            "POST",
            "/api/chat",
            {"Authorization": f"Bearer {attacker.key}", **every_spelling},
            chat,
        )
        assert status == 200
        sent += 1
        # Without a key the token is worth nothing: Caddy drops it, auth refuses.
        status, _, _ = raw_request(e2e_stack, "POST", "/api/chat", every_spelling, chat)
        assert status == 401, label

    charged = await ledger.wait_for_requests(attacker.tenant, sent)
    assert charged.requests == sent
    assert (await ledger.usage(victim.tenant)).requests == 0
    assert {row["key_prefix"] for row in await ledger.audit(attacker.tenant)} == {attacker.prefix}
    # Ollama sees neither the client's key nor any gateway header.
    seen = [r for r in sim_requests(e2e_stack) if marker in json.dumps(r["body"])]
    assert len(seen) == sent
    for request in seen:
        names = {str(n).lower() for n in request["headers"]}  # type: ignore[union-attr]
        assert "authorization" not in names
        assert not {n for n in names if n.startswith(("x-nz", "x_nz"))}


# ---------------------------------------------------------------- body limit at the edge


async def test_oversized_body_gets_413_in_the_route_dialect(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    big = "x" * (2 * 1024 * 1024)  # the e2e Caddy runs with NZ_MAX_BODY=1MB
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        auth = {"Authorization": f"Bearer {caller.key}"}
        openai_style = await client.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "llama3.2", "messages": [{"role": "user", "content": big}]},
        )
        native = await client.post(
            "/api/chat",
            headers=auth,
            json={"model": "llama3.2", "messages": [{"role": "user", "content": big}]},
        )
        # Oversized bodies must not take the proxies out of rotation (Caddy 2.6 sees
        # them as proxy errors; passive health checks would count them): one
        # replica each, both refused, then normal traffic must still pass at once.
        after = [await client.post("/api/chat", headers=auth, json=CHAT_BODY) for _ in range(4)]
    assert openai_style.status_code == 413
    assert openai_style.json()["error"]["code"] == "request_too_large"
    assert native.status_code == 413
    assert isinstance(native.json()["error"], str)
    assert "retry-after" not in native.headers
    assert [r.status_code for r in after] == [200] * 4
    # the oversized bodies never reached Ollama; the 4 normal chats did (a model
    # discovery GET /api/tags may come in between: it is not a chat)
    chats = [r for r in sim_requests(e2e_stack) if r["path"] == "/api/chat"]
    assert len(chats) == 4
    assert all(len(str(r["body"])) < 1000 for r in chats)


class _EchoHeaders(BaseHTTPRequestHandler):
    """Stands where the proxy stands and answers with the headers it received."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(list(self.headers.items())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # Caddy's active health check on /healthz
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def test_the_proxy_receives_only_the_identity_auth_issued(
    e2e_stack: E2EStack, ledger: Ledger, tmp_path: Path
) -> None:
    """Caddy with real auth and an echo server as the proxy: what would the proxy see?"""
    attacker = await ledger.issue()
    victim = await ledger.issue()
    record = await ledger.store.get_key(victim.prefix)
    smuggled = sign_identity(
        _identity_for(record.tenant_id, record.id, victim), TEST_SECRET.encode()
    )
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with extra_caddy(
            e2e_stack,
            tmp_path,
            auth=[u.removeprefix("http://") for u in e2e_stack.auth_urls],
            proxy=[f"127.0.0.1:{echo.server_address[1]}"],
        ) as url:
            spellings = dict.fromkeys(IDENTITY_HEADER_SPELLINGS, smuggled)
            stack = E2EStack(
                url=url, caddy=e2e_stack.caddy, simulator_url="", auth_urls=[], proxy_urls=[]
            )
            status, _, body = raw_request(
                stack,
                "POST",
                "/api/chat",
                {"Authorization": f"Bearer {attacker.key}", **spellings, "X-NZ-Tenant": "1"},
                json.dumps(CHAT_BODY).encode(),
            )
    finally:
        echo.shutdown()
        echo.server_close()
    assert status == 200, body
    received = json.loads(body)
    gateway = [(n, v) for n, v in received if n.lower().replace("_", "-").startswith("x-nz")]
    assert [n.lower() for n, _ in gateway] == ["x-nz-identity"], gateway
    token = gateway[0][1]
    assert token != smuggled
    identity = verify_identity(token, TEST_SECRET.encode(), int(time.time() * 1000))
    assert (identity.key_prefix, identity.tenant_name) == (attacker.prefix, attacker.tenant)


async def test_unreachable_auth_gives_503_in_dialect_and_a_dead_replica_is_skipped(
    e2e_stack: E2EStack, ledger: Ledger, tmp_path: Path
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}"}
    live_auth = [u.removeprefix("http://") for u in e2e_stack.auth_urls]
    proxies = [u.removeprefix("http://") for u in e2e_stack.proxy_urls]
    dead = f"127.0.0.1:{free_port()}"
    with extra_caddy(e2e_stack, tmp_path, auth=[dead], proxy=proxies) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # at once: each waits out Caddy's lb_try_duration (2 s) before its 503
            native, openai_style, anthropic_style = await asyncio.gather(
                client.post("/api/chat", json=CHAT_BODY, headers=auth),
                client.post("/v1/chat/completions", json=OPENAI_BODY, headers=auth),
                client.post("/v1/messages", json={**OPENAI_BODY, "max_tokens": 8}, headers=auth),
            )
    for refused in (native, openai_style, anthropic_style):
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
    assert isinstance(native.json()["error"], str)
    assert openai_style.json()["error"]["code"] == "service_unavailable"
    assert anthropic_style.json()["type"] == "error"
    assert anthropic_style.json()["error"]["type"] == "overloaded_error"
    # One dead replica among live ones: Caddy retries another, every request passes.
    with extra_caddy(e2e_stack, tmp_path, auth=[dead, *live_auth], proxy=[dead, *proxies]) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            answers = [
                await client.post("/api/chat", json=CHAT_BODY, headers=auth) for _ in range(8)
            ]
    assert [r.status_code for r in answers] == [200] * 8
