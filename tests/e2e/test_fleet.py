"""A fleet through real Caddy: two proxy replicas, three simulators as GPUs (issue 12).

The stack is this module's own (its own database, so the backends it
defines reach no other test's proxies): Caddy, two auth and two proxy
replicas (``tests/e2e/processes.start_stack``), and three simulators added
with ``neuronetz-gateway backend add``:

- ``gpu-a``: llama (loaded) and qwen, 2 slots;
- ``gpu-b``: llama (installed, not loaded), 2 slots;
- ``gpu-c``: qwen only (loaded), 2 slots.

The simulators would run 8 requests at once; the gateway's slots are the
limit checked, against the simulators' own ``peak_active``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import httpx
import openai
import pytest

from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from tests.conftest import TEST_SECRET
from tests.e2e.conftest import IssuedKey, Ledger
from tests.e2e.processes import E2EStack, require_caddy, start_stack
from tests.support.caddy import caddy_binaries
from tests.support.cli import run_cli
from tests.support.proxy_stack import SimulatorServer, running_simulator

pytestmark = pytest.mark.e2e

LLAMA = "llama3.2:latest"
QWEN = "qwen2.5:0.5b"
QUEUE_TIMEOUT = 6.0
QUEUE_PING = 0.3


def _chat(model: str = "llama3.2", prompt: str = "hi", stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


@dataclass
class Fleet:
    stack: E2EStack
    database_url: str
    sims: dict[str, SimulatorServer]
    key: IssuedKey

    def headers(self, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key.key}", **extra}

    def served_by(self) -> dict[str, int]:
        """Model requests each simulator received (discovery's own calls left out)."""
        return {
            name: sum(1 for r in sim.requests() if r["path"] in ("/api/chat", "/api/generate"))
            for name, sim in self.sims.items()
        }

    def clear(self) -> None:
        for sim in self.sims.values():
            sim.clear()

    def backend(self, *args: str) -> None:
        run_cli(self.database_url, "backend", *args)


@pytest.fixture(scope="module")
def fleet_database(pg_admin_url: str) -> Iterator[str]:
    name = f"nz_fleet_{os.getpid()}_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    # in a subprocess: the migration engine of this process is bound to the run's database
    run_cli(url, "migrate")
    try:
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def fleet(fleet_database: str, redis_test_url: str, redis_prefix: str) -> Iterator[Fleet]:
    versions = sorted(caddy_binaries())
    # the fleet is not about Caddy's version; without any Caddy this fails, as every e2e does
    caddy = require_caddy(versions[-1] if versions else "none")
    common = {"NZ_SIM_SLOTS": "8", "NZ_SIM_CHUNK_DELAY_MS": "10", "NZ_SIM_LOAD_SECONDS": "0.3"}
    with contextlib.ExitStack() as sims_up:
        sims = {
            "gpu-a": sims_up.enter_context(
                running_simulator(**common, NZ_SIM_MODELS=f"{LLAMA},{QWEN}", NZ_SIM_LOADED=LLAMA)
            ),
            "gpu-b": sims_up.enter_context(running_simulator(**common, NZ_SIM_MODELS=LLAMA)),
            "gpu-c": sims_up.enter_context(
                running_simulator(**common, NZ_SIM_MODELS=QWEN, NZ_SIM_LOADED=QWEN)
            ),
        }
        for name, sim in sims.items():
            add = ["backend", "add", "--name", name, "--url", sim.url, "--slots", "2"]
            run_cli(fleet_database, *add)
        state = Path(tempfile.mkdtemp(prefix="nz-fleet-"))
        env = {
            "PATH": os.environ["PATH"],
            "NZ_DATABASE_URL": fleet_database,
            "NZ_REDIS_URL": redis_test_url,
            "NZ_REDIS_PREFIX": f"{redis_prefix}fleet",
            "NZ_GATEWAY_SECRET": TEST_SECRET,
            "NZ_AUDIT_SPOOL_DIR": str(state / "spool"),
            "NZ_AUDIT_FLUSH_INTERVAL_SECONDS": "0.1",
            "NZ_LOG_FORMAT": "json",
            "NZ_QUEUE_TIMEOUT_SECONDS": str(QUEUE_TIMEOUT),
            "NZ_QUEUE_PING_SECONDS": str(QUEUE_PING),
            "NZ_BACKEND_CHECK_INTERVAL_SECONDS": "0.5",
        }
        stack = start_stack(env=env, log_dir=state, caddy=caddy)
        try:
            key = asyncio.run(_issue(fleet_database))
            yield Fleet(stack, fleet_database, sims, key)
        finally:
            stack.stop()
            shutil.rmtree(state, ignore_errors=True)


async def _issue(database_url: str) -> IssuedKey:
    pool = await open_pool(database_url, min_size=1, max_size=2)
    try:
        return await Ledger(Store(pool)).issue()
    finally:
        await pool.close()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    for sim in fleet.sims.values():
        sim.reset()  # the start-up configuration, nothing recorded
    async with httpx.AsyncClient(base_url=fleet.stack.url, timeout=30) as http:
        yield http


async def _wait_ready(client: httpx.AsyncClient, fleet: Fleet) -> None:
    """Until a model request succeeds (discovery's first round after start or a change)."""
    deadline = time.monotonic() + 15
    while True:
        reply = await client.post("/api/chat", json=_chat(stream=False), headers=fleet.headers())
        if reply.status_code == 200 or time.monotonic() > deadline:
            assert reply.status_code == 200, reply.text
            fleet.clear()
            return
        await asyncio.sleep(0.2)


async def test_a_model_goes_to_a_backend_that_has_it_the_loaded_one_first(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    await _wait_ready(client, fleet)
    for _ in range(4):
        reply = await client.post("/api/chat", json=_chat(stream=False), headers=fleet.headers())
        assert reply.status_code == 200, reply.text
    qwen = await client.post("/api/chat", json=_chat(QWEN, stream=False), headers=fleet.headers())
    assert qwen.status_code == 200, qwen.text
    served = fleet.served_by()
    assert served["gpu-a"] == 4  # llama is loaded there: never a cold load on gpu-b
    assert served["gpu-b"] == 0
    assert served["gpu-c"] == 1  # qwen loaded there (gpu-a would have to load it)


async def test_a_session_sticks_to_one_backend(client: httpx.AsyncClient, fleet: Fleet) -> None:
    await _wait_ready(client, fleet)
    for session in ("s-one", "s-two", "s-three"):
        fleet.clear()
        for _ in range(4):
            reply = await client.post(
                "/v1/chat/completions",
                json={"model": QWEN, "messages": [{"role": "user", "content": "hi"}]},
                headers=fleet.headers(**{"x-claude-code-session-id": session}),
            )
            assert reply.status_code == 200, reply.text
        served = fleet.served_by()
        assert sorted(served.values()) == [0, 0, 4], (session, served)


async def test_fifty_requests_two_replicas_two_backends_of_two_slots(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    """At most 4 run at once (2 per backend), the rest wait, none is lost."""
    await _wait_ready(client, fleet)
    for sim in fleet.sims.values():
        sim.reset()
        sim.configure(chunks=5)  # 50 ms a request: the 50 take well under the queue timeout

    async def one(i: int) -> int:
        reply = await client.post("/api/chat", json=_chat(prompt=f"r{i}"), headers=fleet.headers())
        return reply.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(50)))
    assert statuses == [200] * 50
    for name in ("gpu-a", "gpu-b"):
        stats = fleet.sims[name].stats()
        assert stats["peak_active"] <= 2, (name, stats)
    completed = sum(fleet.sims[n].stats()["completed"] for n in ("gpu-a", "gpu-b"))
    assert completed == 50


async def _until(condition: Any, within: float = 10.0) -> None:
    """Poll an observable condition (the simulators' counters), bounded."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _active(fleet: Fleet, *names: str) -> int:
    return sum(fleet.sims[n].stats()["active"] for n in names)


async def test_queue_timeout_is_503_with_retry_after_in_the_dialect(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    await _wait_ready(client, fleet)
    for sim in fleet.sims.values():
        sim.configure(chunks=20, chunk_delay_ms=400)  # 8 s a request
    holders = [
        asyncio.ensure_future(
            client.post("/api/chat", json=_chat(prompt=f"h{i}"), headers=fleet.headers())
        )
        for i in range(4)  # every llama slot: 2 on gpu-a, 2 on gpu-b
    ]
    try:
        await _until(lambda: _active(fleet, "gpu-a", "gpu-b") == 4)
        started = time.monotonic()
        native, openai = await asyncio.gather(  # both wait behind the holders
            client.post("/api/chat", json=_chat(), headers=fleet.headers()),
            client.post(
                "/v1/chat/completions",
                json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
                headers=fleet.headers(),
            ),
        )
        assert time.monotonic() - started >= QUEUE_TIMEOUT
        assert native.status_code == 503, native.text
        assert int(native.headers["retry-after"]) >= 1
        assert "busy" in native.json()["error"]
        assert openai.status_code == 503, openai.text
        assert openai.json()["error"]["code"] == "service_unavailable"
        assert int(openai.headers["retry-after"]) >= 1
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


async def _raw_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], fleet: Fleet
) -> bytes:
    async with client.stream("POST", path, json=body, headers=fleet.headers()) as reply:
        assert reply.status_code == 200
        return b"".join([part async for part in reply.aiter_bytes()])


async def test_streams_waiting_for_a_slot_get_keepalives_and_the_sdks_parse_them(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    """Every llama slot held: queued OpenAI and Anthropic streams get their keep-alive frames
    (an SSE comment, ``event: ping``) until a slot frees, then their answer; the official
    SDKs read the same streams as usual."""
    await _wait_ready(client, fleet)
    for sim in fleet.sims.values():
        sim.configure(chunks=15, chunk_delay_ms=200)  # 3 s a request, well within the timeout
    streaming: set[int] = set()  # the holders whose answer is flowing (each holds a slot)

    async def hold(i: int) -> None:
        body = _chat(prompt=f"h{i}")
        async with client.stream("POST", "/api/chat", json=body, headers=fleet.headers()) as r:
            async for _ in r.aiter_bytes():
                streaming.add(i)

    holders = [asyncio.ensure_future(hold(i)) for i in range(4)]  # every llama slot
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": True}
    message = {**chat, "max_tokens": 32}
    try:
        await _until(lambda: len(streaming) == 4)
        sdk_openai = openai.AsyncOpenAI(
            base_url=f"{fleet.stack.url}/v1", api_key=fleet.key.key, max_retries=0
        )
        sdk_anthropic = anthropic.AsyncAnthropic(
            base_url=fleet.stack.url, api_key=fleet.key.key, max_retries=0
        )

        async def openai_text() -> str:
            stream = await sdk_openai.chat.completions.create(**chat)  # type: ignore[call-overload]
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return "".join(parts)

        async def anthropic_text() -> str:
            asked = {k: v for k, v in message.items() if k != "stream"}  # .stream() streams
            async with sdk_anthropic.messages.stream(**asked) as stream:  # type: ignore[arg-type]
                final = await stream.get_final_message()
            return "".join(b.text for b in final.content if b.type == "text")

        raw_openai, raw_anthropic, text_openai, text_anthropic = await asyncio.gather(
            _raw_stream(client, "/v1/chat/completions", chat, fleet),
            _raw_stream(client, "/v1/messages", message, fleet),
            openai_text(),
            anthropic_text(),
        )
        await sdk_openai.close()
        await sdk_anthropic.close()
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    before, _, answer = raw_openai.partition(b"data: ")
    assert b": ping\n\n" in before  # while it waited
    assert before.replace(b": ping\n\n", b"") == b""
    assert answer.rstrip().endswith(b"data: [DONE]")
    events = [e.split(b"\n")[0] for e in raw_anthropic.split(b"\n\n") if e.strip()]
    start = events.index(b"event: message_start")
    assert start >= 1
    assert set(events[:start]) == {b"event: ping"}
    assert events[-1] == b"event: message_stop"
    assert text_openai  # the SDKs skipped the keep-alives and read the answers
    assert text_anthropic


async def test_a_drained_backend_finishes_its_running_requests_and_takes_no_new_one(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    await _wait_ready(client, fleet)
    fleet.sims["gpu-a"].configure(chunks=10, chunk_delay_ms=200)  # 2 s a request
    running = asyncio.ensure_future(
        client.post("/api/chat", json=_chat(prompt="long"), headers=fleet.headers())
    )
    try:
        await _until(lambda: fleet.served_by()["gpu-a"] == 1)  # it runs there
        fleet.backend("drain", "--name", "gpu-a")
        # within a second every replica knows: new llama requests go to gpu-b
        await _until(lambda: fleet.served_by()["gpu-b"] > 0 or _probe_once(fleet), within=10)
        before = fleet.served_by()["gpu-a"]
        for _ in range(3):
            reply = await client.post(
                "/api/chat", json=_chat(stream=False), headers=fleet.headers()
            )
            assert reply.status_code == 200, reply.text
        assert fleet.served_by()["gpu-a"] == before  # nothing new on the drained one
        finished = await running
        assert finished.status_code == 200
        assert b'"done":true' in finished.content  # the running one finished
    finally:
        fleet.backend("enable", "--name", "gpu-a")


def _probe_once(fleet: Fleet) -> bool:
    """One llama request (synchronously, through Caddy): did it avoid gpu-a?"""
    before = fleet.served_by()["gpu-a"]
    reply = httpx.post(
        fleet.stack.url + "/api/chat", json=_chat(stream=False), headers=fleet.headers(), timeout=30
    )
    assert reply.status_code == 200, reply.text
    return fleet.served_by()["gpu-a"] == before


async def test_failover_when_a_backend_is_down_and_all_down_is_503_fast(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    await _wait_ready(client, fleet)
    fleet.sims["gpu-c"].configure(failure="busy")  # Ollama's 503
    for _ in range(4):
        reply = await client.post(
            "/api/chat", json=_chat(QWEN, stream=False), headers=fleet.headers()
        )
        assert reply.status_code == 200, reply.text  # retried on gpu-a
    fleet.sims["gpu-a"].configure(failure="busy")
    started = time.monotonic()
    reply = await client.post("/api/chat", json=_chat(QWEN, stream=False), headers=fleet.headers())
    assert reply.status_code == 503
    assert time.monotonic() - started < 1.0
