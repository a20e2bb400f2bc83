"""Streaming: chunks pass as they come, a leaving client cancels upstream, failures are clear."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.adapters.redis_client import open_redis
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.proxy.relay import ClientWatch
from neuronetz_gateway.simulator.app import BUSY_MESSAGE, MIDSTREAM_ERROR_MESSAGE
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import eventually, new_ids, wait_audit_rows
from tests.support.proxy_stack import ProxyServer, SimulatorServer, running_proxy
from tests.support.servers import free_port

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "tell me a story"}]}

pytest_plugins = ["tests.support.proxy_fixtures"]


@pytest.fixture
async def limiter(redis_test_url: str, redis_prefix: str, store: Store) -> AsyncIterator[Limiter]:
    redis = await open_redis(redis_test_url)
    limiter = Limiter(redis, prefix=redis_prefix, ledger=store)
    yield limiter
    await limiter.aclose()
    await redis.aclose()


async def test_chunks_reach_the_client_as_the_simulator_emits_them(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.configure(chunks=8, chunk_delay_ms=150)
    arrivals: list[float] = []
    async with httpx.AsyncClient(timeout=10) as client:
        start = time.monotonic()
        async with client.stream(
            "POST", f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: signed("chat")}
        ) as reply:
            assert reply.status_code == 200
            assert reply.headers["x-request-id"]
            async for line in reply.aiter_lines():
                if line:
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 9  # 8 chunks and the final one
    # relayed as emitted: the first line arrives long before the last (8 delays of
    # 150 ms); a buffered relay would deliver them together. No absolute deadline:
    # a loaded machine may start the stream late.
    assert arrivals[-1] - arrivals[0] > 0.9


async def test_openai_stream_is_relayed_incrementally(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.configure(chunks=6, chunk_delay_ms=150)
    arrivals: list[float] = []
    async with httpx.AsyncClient(timeout=10) as client:
        start = time.monotonic()
        async with client.stream(
            "POST",
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={IDENTITY_HEADER: signed("v1.chat.completions")},
        ) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            async for line in reply.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line:
                    arrivals.append(time.monotonic() - start)
    assert arrivals[-1] - arrivals[0] > 0.5  # relayed as emitted, not buffered


async def test_client_disconnect_cancels_upstream_charges_partial_and_frees_lease(
    proxy: ProxyServer,
    sim: SimulatorServer,
    store: Store,
    limiter: Limiter,
    redis_prefix: str,
) -> None:
    sim.configure(chunks=40, chunk_delay_ms=50)
    ids = new_ids()
    limits = Limits(concurrency=5)
    admitted = await limiter.admit(
        key_limits=limits, tenant_limits=limits, request_id="admit", **ids
    )
    assert admitted.lease_id is not None
    conc_key = f"{redis_prefix}:{{t{ids['tenant_id']}}}:conc:k{ids['key_id']}"
    request_id = f"req-leave-{ids['key_id']}"
    token = signed(
        "chat",
        request_id=request_id,
        lease_id=admitted.lease_id,
        key_limits=limits,
        tenant_limits=limits,
        **ids,
    )
    received = 0
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream(
            "POST", f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
        ) as reply,
    ):
        async for line in reply.aiter_lines():
            if line:
                received += 1
            if received == 5:
                break  # leaving the block closes the connection mid-stream
    assert await eventually(lambda: sim.stats()["cancelled"] >= 1)
    stats = sim.stats()
    assert stats["cancelled"] == 1
    assert stats["completed"] == 0
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["client_disconnected"] is True
    assert row["estimated"] is True
    assert row["streamed"] is True
    assert 5 <= row["completion_tokens"] < 40
    assert row["prompt_tokens"] > 0  # the prompt estimate
    assert await limiter._redis.zcard(conc_key) == 0


def test_busy_upstream_is_a_clear_503(proxy: ProxyServer, sim: SimulatorServer) -> None:
    sim.configure(failure="busy")
    reply = httpx.post(
        f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: signed("chat")}
    )
    assert reply.status_code == 503
    assert reply.json() == {"error": BUSY_MESSAGE}
    assert reply.headers["retry-after"] == "1"


async def test_midstream_error_line_is_relayed_and_audited(
    proxy: ProxyServer, sim: SimulatorServer, store: Store
) -> None:
    sim.configure(failure="midstream_error", failure_after=3)
    request_id = "req-mid-" + str(new_ids()["key_id"])
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(
            f"{proxy.url}/api/chat",
            json=CHAT,
            headers={IDENTITY_HEADER: signed("chat", request_id=request_id)},
        )
        openai = await client.post(
            f"{proxy.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={IDENTITY_HEADER: signed("v1.chat.completions")},
        )
    lines = [msgspec.json.decode(line) for line in reply.content.splitlines() if line]
    assert len(lines) == 4
    assert lines[-1] == {"error": MIDSTREAM_ERROR_MESSAGE}
    row = (await wait_audit_rows(store, [request_id]))[request_id]
    assert row["status"] == 502
    assert row["estimated"] is True
    assert row["completion_tokens"] == 3  # the streamed chunks (the error line is not one)

    frames = [f for f in openai.text.split("\n\n") if f]
    assert MIDSTREAM_ERROR_MESSAGE in frames[-1]
    assert '"error"' in frames[-1]


@pytest.fixture(scope="module")
def impatient_proxy(
    simulator: SimulatorServer, database_url: str, redis_test_url: str, redis_prefix: str
) -> Iterator[ProxyServer]:
    with running_proxy(
        database_url=database_url,
        redis_url=redis_test_url,
        redis_prefix=redis_prefix + "i",
        ollama_url=simulator.url,
        NZ_UPSTREAM_READ_TIMEOUT_SECONDS="1",
    ) as server:
        yield server


async def test_hanging_upstream_ends_in_an_error_not_a_hang(
    impatient_proxy: ProxyServer, sim: SimulatorServer
) -> None:
    sim.configure(failure="hang_after", failure_after=2, chunk_delay_ms=1)
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(
            f"{impatient_proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "hi"},
            headers={IDENTITY_HEADER: signed("generate")},
        )
    assert time.monotonic() - start < 5  # read timeout 1 s, not a hang
    last = msgspec.json.decode(reply.content.splitlines()[-1])
    assert "error" in last
    assert await eventually(lambda: sim.stats()["cancelled"] >= 1)  # upstream closed
    assert sim.stats()["cancelled"] == 1


def test_unreachable_upstream_is_502_or_503_never_a_hang(
    database_url: str, redis_test_url: str, redis_prefix: str
) -> None:
    with running_proxy(
        database_url=database_url,
        redis_url=redis_test_url,
        redis_prefix=redis_prefix + "u",
        ollama_url=f"http://127.0.0.1:{free_port()}",
    ) as dead:
        version = httpx.get(f"{dead.url}/api/version", headers={IDENTITY_HEADER: signed("version")})
        assert version.status_code == 502
        assert "unavailable" in version.json()["error"]
        chat = httpx.post(
            f"{dead.url}/v1/chat/completions",
            json=CHAT,
            headers={IDENTITY_HEADER: signed("v1.chat.completions")},
        )
        assert chat.status_code == 503  # no model list: fail closed
        assert chat.json()["error"]["code"] == "service_unavailable"
        assert chat.headers["retry-after"] == "1"


async def test_client_watch_renews_while_the_answer_runs_and_sees_the_client_leave() -> None:
    messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    renewals: list[float] = []
    left: list[bool] = []

    async def receive() -> dict[str, object]:
        return await messages.get()

    async def renew() -> None:
        renewals.append(time.monotonic())

    started = time.monotonic()
    watch = ClientWatch(receive, lambda: left.append(True), renew, renew_every=0.05)
    await asyncio.sleep(0.28)
    assert 3 <= len(renewals) <= 6  # every 0.05 s while it runs
    assert all(r - started >= 0.05 for r in renewals)
    await messages.put({"type": "http.request", "body": b"", "more_body": False})
    await asyncio.sleep(0.01)
    assert not watch.left  # a stray body message is not a disconnect
    await messages.put({"type": "http.disconnect"})
    await asyncio.sleep(0.01)
    assert watch.left
    assert left == [True]
    count = len(renewals)
    await asyncio.sleep(0.12)
    assert len(renewals) == count  # a client that left gets no more renewals
    await watch.close()


async def test_client_watch_close_stops_everything() -> None:
    renewals: list[int] = []
    never: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, object]:
        return await never

    async def renew() -> None:
        renewals.append(1)

    watch = ClientWatch(receive, lambda: None, renew, renew_every=0.03)
    await watch.close()
    await asyncio.sleep(0.1)
    assert renewals == []
    assert not watch.left
    # without a lease there is nothing to renew, and closing is as quiet
    quiet = ClientWatch(receive, lambda: None, None, renew_every=0.01)
    await asyncio.sleep(0.03)
    await quiet.close()


async def test_client_watch_runs_no_task_of_its_own() -> None:
    """Granian's receive is a future: watching it costs a callback and a timer, no task."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[dict[str, object]]] = []
    left: list[bool] = []

    def receive() -> asyncio.Future[dict[str, object]]:
        pending.append(loop.create_future())
        return pending[-1]

    async def renew() -> None:
        return None

    tasks = len(asyncio.all_tasks())
    watch = ClientWatch(receive, lambda: left.append(True), renew, renew_every=10.0)
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == tasks
    pending[-1].set_result({"type": "http.disconnect"})
    await asyncio.sleep(0)
    assert watch.left
    assert left == [True]
    await watch.close()
    # closed before the client left: the pending receive is given up
    quiet = ClientWatch(receive, lambda: left.append(True), renew, renew_every=10.0)
    await quiet.close()
    assert pending[-1].cancelled()
    assert left == [True]
