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
import re
import secrets
import shutil
import signal
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
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_slots import SlotAdmission
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.domain.errors import NotFound
from tests.conftest import TEST_SECRET
from tests.e2e.conftest import IssuedKey, Ledger
from tests.e2e.processes import E2EStack, require_caddy, start_stack
from tests.support.caddy import caddy_binaries
from tests.support.cli import run_cli, run_cli_json
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


async def _llama_loaded_on_both(fleet: Fleet) -> None:
    """gpu-b has llama loaded too, and discovery has seen it (a few ``/api/ps`` rounds since).

    With one of them cold, a request finding gpu-a's slots held may rather wait there
    than load llama on gpu-b (routing weighs the wait against a load), so a test that
    needs every llama slot filled at once starts from both warm.
    """
    gpu_b = fleet.sims["gpu-b"]
    gpu_b.configure(loaded=[LLAMA])

    def polls() -> int:
        return sum(1 for r in gpu_b.requests() if r["path"] == "/api/ps")

    seen = polls()
    await _until(lambda: polls() >= seen + 4)


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
    """At most 4 run at once (2 per backend), the rest wait, none is lost.

    Counted where it matters, on the simulators (each would run 8 at once);
    both proxy replicas admit requests to both backends (so the limit is the
    shared leases in Redis, not a per-replica count), and some wait.
    """
    await _wait_ready(client, fleet)
    for sim in fleet.sims.values():
        sim.reset()
        sim.configure(chunks=5)  # 50 ms a request: the 50 take well under the queue timeout
    await _llama_loaded_on_both(fleet)
    before = [_admissions(text) for text in _replica_metrics(fleet)]

    async def one(i: int) -> tuple[int, bytes]:
        reply = await client.post("/api/chat", json=_chat(prompt=f"r{i}"), headers=fleet.headers())
        return reply.status_code, reply.content

    replies = await asyncio.gather(*(one(i) for i in range(50)))
    assert [status for status, _ in replies] == [200] * 50
    assert all(b'"done":true' in body for _, body in replies)  # each one whole
    for name in ("gpu-a", "gpu-b"):
        stats = fleet.sims[name].stats()
        assert stats["peak_active"] <= 2, (name, stats)
    assert fleet.served_by()["gpu-c"] == 0  # no llama there
    completed = sum(fleet.sims[n].stats()["completed"] for n in ("gpu-a", "gpu-b"))
    assert completed == 50
    after = [_admissions(text) for text in _replica_metrics(fleet)]
    admitted = [
        {b: a[b][0] - b0.get(b, (0, 0))[0] for b in a} for a, b0 in zip(after, before, strict=True)
    ]
    waited = sum(
        a[b][1] - b0.get(b, (0, 0))[1] for a, b0 in zip(after, before, strict=True) for b in a
    )
    for replica in admitted:  # both replicas took part, on both backends
        assert replica.get("gpu-a", 0) > 0 and replica.get("gpu-b", 0) > 0, admitted
    assert sum(sum(r.values()) for r in admitted) == 50
    assert waited > 0  # 50 on 4 slots: some waited in the queue


def _replica_metrics(fleet: Fleet) -> list[str]:
    """Each proxy replica's ``/metrics`` (straight from its port, behind Caddy)."""
    return [httpx.get(url + "/metrics", timeout=10).text for url in fleet.stack.proxy_urls]


_SAMPLE = re.compile(r"^(nz_proxy_pool_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$", re.MULTILINE)


def _samples(text: str, metric: str) -> dict[str, dict[str, float]]:
    """``metric``'s samples by backend: label set (without backend) as text -> value."""
    found: dict[str, dict[str, float]] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if name != metric:
            continue
        parts = dict(re.findall(r'([a-z_]+)="([^"]*)"', labels))
        backend = parts.pop("backend", "")
        key = ",".join(f"{k}={v}" for k, v in sorted(parts.items()))
        found.setdefault(backend, {})[key] = float(value)
    return found


def _admissions(text: str) -> dict[str, tuple[int, int]]:
    """Per backend on one replica: slots admitted, and of those, how many had waited."""
    counts = _samples(text, "nz_proxy_pool_queue_wait_seconds_count")
    at_once = _samples(text, "nz_proxy_pool_queue_wait_seconds_bucket")
    out: dict[str, tuple[int, int]] = {}
    for backend, values in counts.items():
        total = int(values.get("", 0))
        instant = int(at_once.get(backend, {}).get("le=0.005", 0))
        out[backend] = (total, total - instant)
    return out


def _gauge(text: str, metric: str, backend: str) -> float | None:
    return _samples(text, metric).get(backend, {}).get("")


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
    await _llama_loaded_on_both(fleet)
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
    await _llama_loaded_on_both(fleet)
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
        for sim in fleet.sims.values():  # the holders' 15 chunks are fixed; the rest need few
            sim.configure(chunks=3)
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


# -- a backend of the test's own: killed, with one slot, added and removed ---------------

MISTRAL = "mistral:7b"  # on the killed pair only
PHI = "phi3:mini"  # on the one-slot backend only
GEMMA = "gemma2:2b"  # on the backend added while traffic runs only


@pytest.fixture
async def fleet_store(fleet: Fleet) -> AsyncIterator[Store]:
    """The fleet database (backends the test adds and removes itself, its audit rows)."""
    pool = await open_pool(fleet.database_url, min_size=1, max_size=2)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _own_backends(
    store: Store, sims: dict[str, SimulatorServer], slots: int
) -> AsyncIterator[None]:
    """``sims`` as backends of ``slots`` slots each while the block runs (then removed)."""
    for name, sim in sims.items():
        await store.add_backend(BackendSpec.checked(name, sim.url, slots))
    try:
        yield
    finally:
        for name in sims:
            with contextlib.suppress(NotFound):
                await store.remove_backend(name)


async def _known_everywhere(
    client: httpx.AsyncClient, fleet: Fleet, model: str, backends: list[str]
) -> None:
    """Until every replica routes ``model`` and sees ``backends`` healthy (bounded, 15 s).

    A replica's health gauges are set on each of its requests, so requests go
    through Caddy (to either replica) until both show every backend healthy.
    """
    deadline = time.monotonic() + 15
    while True:
        replies = await asyncio.gather(
            *(
                client.post("/api/chat", json=_chat(model, stream=False), headers=fleet.headers())
                for _ in range(4)
            )
        )
        texts = _replica_metrics(fleet)
        if all(r.status_code == 200 for r in replies) and all(
            _gauge(text, "nz_proxy_pool_backend_healthy", b) == 1
            for text in texts
            for b in backends
        ):
            return
        assert time.monotonic() < deadline, [r.text for r in replies]
        await asyncio.sleep(0.1)


@dataclass
class _Outcome:
    """One streamed request of the traffic, as its client saw it."""

    prompt: str
    surface: str
    status: int = 0
    request_id: str = ""
    body: bytes = b""
    hung: bool = False

    @property
    def complete(self) -> bool:
        if self.surface == "native":
            return b'"done":true' in self.body and b'"error"' not in self.body
        return self.body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in self.body

    @property
    def broke_off(self) -> bool:
        """Ended by the mid-stream error of its dialect (native: error line; OpenAI: event)."""
        if self.surface == "native":
            last = self.body.rstrip().rsplit(b"\n", 1)[-1]
            return last.startswith(b'{"error"')
        return b'data: {"error"' in self.body


async def _stream(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    model: str,
    prompt: str,
    surface: str,
    sink: list[_Outcome] | None = None,
) -> _Outcome:
    """One streamed request (its outcome, as it goes, appended to ``sink`` when given)."""
    outcome = _Outcome(prompt, surface)
    if sink is not None:
        sink.append(outcome)
    if surface == "native":
        path, body = "/api/chat", _chat(model, prompt)
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    try:
        async with asyncio.timeout(20):  # a hang is a failure, not a wait
            async with client.stream("POST", path, json=body, headers=headers) as reply:
                outcome.status = reply.status_code
                outcome.request_id = reply.headers.get("x-request-id", "")
                async for data in reply.aiter_bytes():
                    outcome.body += data
    except TimeoutError:
        outcome.hung = True
    return outcome


async def _traffic(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    model: str,
    stop: asyncio.Event,
    clients: int,
    tag: str,
    sink: list[_Outcome] | None = None,
) -> list[_Outcome]:
    """``clients`` concurrent clients, each streaming one request after another until ``stop``."""

    async def one_client(c: int) -> list[_Outcome]:
        done: list[_Outcome] = []
        surface = "native" if c % 2 == 0 else "openai"
        n = 0
        while not stop.is_set():
            done.append(await _stream(client, headers, model, f"{tag}-c{c}-n{n}", surface, sink))
            n += 1
        return done

    per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
    return [o for outcomes in per_client for o in outcomes]


def _kill_hard(sim: SimulatorServer) -> None:
    """SIGKILL the simulator: its Granian worker (which serves) and the main process."""
    pids = [*_descendants(sim.proc.pid), sim.proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sim.proc.wait(10)
    deadline = time.monotonic() + 10
    while True:  # the worker is gone once its port refuses connections
        try:
            httpx.get(sim.url + "/api/version", timeout=0.5)
        except httpx.ConnectError:
            return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{sim.url} still answers after SIGKILL"
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _streaming_on(sim: SimulatorServer, live: list[_Outcome]) -> list[_Outcome]:
    """Streams under way whose client has a first line (of 40) from ``sim``, few more."""
    started = [o for o in live if 1 <= o.body.count(b"\n") <= 5 and not o.complete]
    return [o for o in started if o.prompt in _prompts(sim)] if started else []


def _prompts(sim: SimulatorServer) -> set[str]:
    """The user prompts of the model requests ``sim`` received."""
    return {
        str(r["body"]["messages"][-1]["content"])
        for r in sim.requests()
        if r["path"] == "/api/chat"
        and isinstance(r.get("body"), dict)
        and r["body"].get("messages")
    }


async def test_a_backend_killed_mid_traffic_fails_over_all_not_yet_streaming(
    client: httpx.AsyncClient, fleet: Fleet, fleet_store: Store
) -> None:
    """Two backends with a model, 8 clients streaming; one simulator SIGKILLed.

    Every request that had not started streaming on it gets its whole answer
    from the other; those streaming on it end with the mid-stream error of
    their dialect (none hangs); the audit ledger has one row per request.
    """
    ledger = Ledger(fleet_store)
    key = await ledger.issue()
    headers = {"authorization": f"Bearer {key.key}"}
    common = {"NZ_SIM_SLOTS": "8", "NZ_SIM_MODELS": MISTRAL, "NZ_SIM_LOADED": MISTRAL}
    # the doomed one streams slowly (2 s), so a stream its client has seen start is
    # still under way when the kill comes, however late a loaded machine runs the test
    with (
        running_simulator(**common, NZ_SIM_CHUNKS="10", NZ_SIM_CHUNK_DELAY_MS="30") as keep,
        running_simulator(**common, NZ_SIM_CHUNKS="40", NZ_SIM_CHUNK_DELAY_MS="50") as doomed,
    ):
        async with _own_backends(fleet_store, {"gpu-k1": keep, "gpu-k2": doomed}, slots=2):
            await _known_everywhere(client, fleet, MISTRAL, ["gpu-k1", "gpu-k2"])
            keep.clear()
            stop = asyncio.Event()
            live: list[_Outcome] = []
            traffic = asyncio.ensure_future(
                _traffic(client, headers, MISTRAL, stop, 8, "kill", live)
            )
            try:
                # both serve, and streams run on the doomed one
                await _until(lambda: keep.stats()["completed"] >= 4, within=15)
                # a stream that reached its client from the doomed one, with most of it to come
                await _until(lambda: bool(_streaming_on(doomed, live)), within=15)
                _kill_hard(doomed)
                after_kill = keep.stats()["completed"]
                await _until(lambda: keep.stats()["completed"] >= after_kill + 8, within=20)
            finally:
                stop.set()
                outcomes = await traffic
            survivor = _prompts(keep)
    failed = [o for o in outcomes if o.status != 200 or o.hung]
    assert not failed, [(o.prompt, o.status, o.hung, o.body[-300:]) for o in failed]
    broken = [o for o in outcomes if not o.complete]
    assert all(o.broke_off for o in broken), [o.body[-300:] for o in broken]
    assert broken, "no stream was running on the killed backend"
    assert not {o.prompt for o in broken} & survivor  # they were on the killed one
    assert len(outcomes) >= 16  # 8 clients, each on at least its second request
    rows = await _audit_rows(ledger, key.tenant, len(outcomes))
    assert sorted(r["request_id"] for r in rows) == sorted(o.request_id for o in outcomes)
    by_id = {r["request_id"]: r for r in rows}
    assert all(by_id[o.request_id]["status"] == 502 for o in broken)
    assert all(by_id[o.request_id]["status"] == 200 for o in outcomes if o.complete)


async def _audit_rows(ledger: Ledger, tenant: str, count: int) -> list[dict[str, Any]]:
    """The tenant's audit rows once ``count`` are there (bounded wait; the writer batches)."""
    await ledger.wait_for_requests(tenant, count, within=15)
    await asyncio.sleep(0.5)  # a row more than expected would land by now
    return await ledger.audit(tenant, limit=count + 50)


@pytest.fixture
async def slot_state(fleet: Fleet, redis_test_url: str, redis_prefix: str) -> AsyncIterator[Any]:
    """A backend's slots held and queue, as the proxies keep them in Redis."""
    redis = await open_redis(redis_test_url)
    admission = SlotAdmission(redis, prefix=f"{redis_prefix}fleet")

    async def state(backend: str, capacity: int) -> tuple[int, int]:
        found = await admission.state(backend, capacity=capacity)
        return found.held, found.queued

    try:
        yield state
    finally:
        await admission.aclose()
        await close_redis(redis)


async def _until_async(condition: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_a_client_leaving_while_queued_frees_its_place(
    client: httpx.AsyncClient,
    fleet: Fleet,
    fleet_store: Store,
    slot_state: Any,
    redis_test_url: str,
) -> None:
    """One slot held by a long stream; a second client queues, then leaves.

    Its ticket leaves the queue at once (the holder still running), it never
    reaches the backend, and a third request gets the slot when the first ends.
    """
    with running_simulator(
        NZ_SIM_SLOTS="8", NZ_SIM_MODELS=PHI, NZ_SIM_LOADED=PHI, NZ_SIM_CHUNK_DELAY_MS="10"
    ) as sim:
        async with _own_backends(fleet_store, {"gpu-q": sim}, slots=1):
            await _known_everywhere(client, fleet, PHI, ["gpu-q"])
            sim.reset()
            sim.configure(chunks=80, chunk_delay_ms=100)  # 8 s
            live: list[_Outcome] = []
            holder = asyncio.ensure_future(
                _stream(client, fleet.headers(), PHI, "holder", "native", live)
            )
            try:
                await _until(lambda: sim.stats()["active"] == 1)
                leaver = asyncio.ensure_future(
                    _stream(client, fleet.headers(), PHI, "leaver", "native")
                )
                await _until_async(lambda: _is(slot_state("gpu-q", 1), (1, 1)), within=10)
                leaver.cancel()  # the client goes away while it waits
                with contextlib.suppress(asyncio.CancelledError):
                    await leaver
                await _until_async(lambda: _is(slot_state("gpu-q", 1), (1, 0)), within=10)
                # freed while the holder still runs, and the leaver never reached the backend
                assert sim.stats()["completed"] == 0
                assert _prompts(sim) == {"holder"}
                # sent near the holder's end (within the queue timeout of it): it gets the
                # slot when the holder ends, not the leaver's old place
                await _until(lambda: live[0].body.count(b"\n") >= 60 or holder.done(), within=20)
                # the holder's 80 chunks were fixed when it started; the third needs no 8 s
                sim.configure(chunks=5)
                third = _stream(client, fleet.headers(), PHI, "third", "native")
                first, last = await asyncio.gather(holder, third)
            finally:
                holder.cancel()
                await asyncio.gather(holder, return_exceptions=True)
            assert first.complete and last.complete, (first.body[-200:], last.body[-200:])
            assert _prompts(sim) == {"holder", "third"}  # the leaver never reached it
            assert sim.stats()["peak_active"] == 1
            await _until_async(lambda: _is(slot_state("gpu-q", 1), (0, 0)), within=10)
            listed = run_cli_json(
                fleet.database_url,
                "backend",
                "list",
                env_changes={"NZ_REDIS_URL": redis_test_url, "NZ_REDIS_PREFIX": _prefix(fleet)},
            )
            row = next(r for r in listed if r["name"] == "gpu-q")
            assert (row["in_flight"], row["queued"]) == (0, 0), row


async def _is(state: Any, expected: tuple[int, int]) -> bool:
    return bool(await state == expected)


def _prefix(fleet: Fleet) -> str:
    return fleet.stack.specs["proxy1"][1]["NZ_REDIS_PREFIX"]


async def test_a_backend_added_and_removed_while_traffic_runs(
    client: httpx.AsyncClient, fleet: Fleet, fleet_store: Store
) -> None:
    """``backend add`` (the CLI) under traffic: its model served by both replicas within 1 s;
    ``backend remove`` under traffic: within 1 s nothing new reaches it, its running
    requests finish, no request fails."""
    await _wait_ready(client, fleet)
    for sim in fleet.sims.values():
        sim.configure(chunks=5)
    stop, committed = asyncio.Event(), asyncio.Event()
    with running_simulator(
        NZ_SIM_SLOTS="8",
        NZ_SIM_MODELS=f"{LLAMA},{GEMMA}",
        NZ_SIM_LOADED=f"{LLAMA},{GEMMA}",
        NZ_SIM_CHUNKS="5",
        NZ_SIM_CHUNK_DELAY_MS="10",
    ) as added:
        traffic = asyncio.ensure_future(
            _traffic(client, fleet.headers(), "llama3.2", stop, 6, "ar")
        )
        try:
            await _until(lambda: fleet.served_by()["gpu-a"] >= 4)  # traffic runs
            before = [_admissions(t).get("gpu-d", (0, 0))[0] for t in _replica_metrics(fleet)]
            cli = asyncio.ensure_future(
                asyncio.to_thread(
                    fleet.backend, "add", "--name", "gpu-d", "--url", added.url, "--slots", "4"
                )
            )
            added_at = await _committed(fleet_store, "gpu-d", present=True)
            while True:  # poll: within 1 s both replicas send gemma to it
                replies = await asyncio.gather(
                    *(
                        client.post(
                            "/api/chat", json=_chat(GEMMA, stream=False), headers=fleet.headers()
                        )
                        for _ in range(4)
                    )
                )
                if all(r.status_code == 200 for r in replies):
                    now = [_admissions(t).get("gpu-d", (0, 0))[0] for t in _replica_metrics(fleet)]
                    if all(n > b for n, b in zip(now, before, strict=True)):
                        break
                assert time.monotonic() - added_at <= 1.0, [r.text[:200] for r in replies]
            await cli
            for reply in await asyncio.gather(
                *(
                    client.post(
                        "/api/chat", json=_chat(GEMMA, stream=False), headers=fleet.headers()
                    )
                    for _ in range(6)
                )
            ):
                assert reply.status_code == 200, reply.text
            # streams of its own model (1 s each, a new one every 0.3 s) run on it while it
            # goes: those it received finish
            added.configure(chunks=20, chunk_delay_ms=50)
            own = asyncio.ensure_future(_overlapping(client, fleet.headers(), GEMMA, committed))
            await _until(lambda: added.stats()["active"] >= 2)
            cli = asyncio.ensure_future(
                asyncio.to_thread(fleet.backend, "remove", "--name", "gpu-d")
            )
            removed_at = await _committed(fleet_store, "gpu-d", present=False)
            running = added.stats()["active"]
            committed.set()
            await cli
            await asyncio.sleep(max(0.0, removed_at + 1.0 - time.monotonic()))
            reached = len(_prompts(added))
            served = sum(fleet.served_by().values())
            await _until(lambda: sum(fleet.served_by().values()) >= served + 12, within=20)
            assert len(_prompts(added)) == reached  # nothing new after the first second
            on_it = _prompts(added)
            own_outcomes = await own
            assert all(o.complete for o in own_outcomes if o.prompt in on_it), [
                (o.prompt, o.status, o.body[-200:]) for o in own_outcomes if o.prompt in on_it
            ]
            await _until(lambda: added.stats()["active"] == 0, within=10)
            assert added.stats()["cancelled"] == 0  # its running requests finished
        finally:
            stop.set()
            committed.set()  # no more streams of its own (the test may have failed before)
            outcomes = await traffic
            with contextlib.suppress(NotFound):  # the test failed before its remove
                await fleet_store.remove_backend("gpu-d")
    failed = [o for o in outcomes if o.status != 200 or o.hung or not o.complete]
    assert not failed, [(o.prompt, o.status, o.body[-200:]) for o in failed]
    assert running >= 1


async def _committed(store: Store, name: str, *, present: bool) -> float:
    """When the CLI's change of backend ``name`` is committed (polled; the CLI's own start-up
    under a loaded machine takes seconds, the 1 s bound runs from the commit)."""
    deadline = time.monotonic() + 60
    while (name in {b.spec.name for b in await store.list_backends()}) != present:
        assert time.monotonic() < deadline, f"backend {name} not {'added' if present else 'gone'}"
        await asyncio.sleep(0.02)
    return time.monotonic()


async def _overlapping(
    client: httpx.AsyncClient, headers: dict[str, str], model: str, until: asyncio.Event
) -> list[_Outcome]:
    """A new stream of ``model`` every 0.3 s until ``until``; all their outcomes."""
    started: list[asyncio.Future[_Outcome]] = []
    while not until.is_set():
        prompt = f"own-{len(started)}"
        started.append(asyncio.ensure_future(_stream(client, headers, model, prompt, "native")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), 0.3)
    return list(await asyncio.gather(*started))
