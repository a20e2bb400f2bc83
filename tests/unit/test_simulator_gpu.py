"""The simulator as a GPU: slots per model, a bounded queue, cold loads, eviction, /api/ps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from neuronetz_gateway.simulator import SimulatorApp, SimulatorConfig, create_simulator_app
from neuronetz_gateway.simulator.gpu import BUSY_MESSAGE, GpuModel, keep_alive_seconds
from tests.unit.test_simulator import served_simulator

# Ollama's ProcessModelResponse (api/types.go) and its ModelDetails
PS_FIELDS = {"name", "model", "size", "digest", "details", "expires_at", "size_vram"}
PS_FIELDS |= {"context_length"}
DETAILS_FIELDS = {
    "parent_model",
    "format",
    "family",
    "families",
    "parameter_size",
    "quantization_level",
}


def _chat(model: str = "llama3.2", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }


@pytest.fixture
def app() -> SimulatorApp:
    # a token every 10 ms, 3 per answer: a request holds its slot ~30 ms
    return create_simulator_app(SimulatorConfig(chunks=3, tokens_per_second=100))


@pytest.fixture
async def client(app: SimulatorApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


async def _stats(client: httpx.AsyncClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await client.get("/_sim/stats")).json()
    return stats


async def test_slots_bound_what_runs_at_once_and_the_rest_wait(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/_sim/config", json={"slots": 2})
    answers = await asyncio.gather(*(client.post("/api/chat", json=_chat()) for _ in range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    stats = await _stats(client)
    assert stats["peak_active"] == 2
    assert stats["completed"] == 6 and stats["waiting"] == 0


async def test_without_slots_nothing_waits(client: httpx.AsyncClient) -> None:
    answers = await asyncio.gather(*(client.post("/api/chat", json=_chat()) for _ in range(5)))
    assert {a.status_code for a in answers} == {200}
    assert (await _stats(client))["peak_active"] == 5


async def test_a_full_queue_is_ollamas_503(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"slots": 1, "max_queue": 1})
    answers = await asyncio.gather(*(client.post("/api/chat", json=_chat()) for _ in range(3)))
    assert sorted(a.status_code for a in answers) == [200, 200, 503]
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }
    assert (await _stats(client))["busy"] == 1


async def test_slots_are_per_model(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"slots": 1, "max_queue": 0})
    answers = await asyncio.gather(
        client.post("/api/chat", json=_chat("llama3.2")),
        client.post("/api/chat", json=_chat("qwen2.5:0.5b")),
    )
    assert [a.status_code for a in answers] == [200, 200]
    assert (await _stats(client))["peak_active"] == 2


async def test_a_cold_load_takes_load_seconds_and_is_shared(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"load_seconds": 0.05})
    assert (await client.get("/api/ps")).json() == {"models": []}
    cold = await asyncio.gather(*(client.post("/api/chat", json=_chat()) for _ in range(3)))
    assert {a.json()["load_duration"] for a in cold} == {50_000_000}
    warm = (await client.post("/api/chat", json=_chat())).json()
    assert warm["load_duration"] == 1_000_000
    assert (await _stats(client))["loads"] == 1  # three requests, one load
    names = [m["name"] for m in (await client.get("/api/ps")).json()["models"]]
    assert names == ["llama3.2:latest"]


async def test_too_many_models_evict_the_least_recently_used(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"max_loaded": 2})
    for model in ("llama3.2", "qwen2.5:0.5b", "llama3.2", "nomic-embed-text"):
        path = "/api/embed" if "embed" in model else "/api/chat"
        body = {"model": model, "input": "x"} if "embed" in model else _chat(model)
        assert (await client.post(path, json=body)).status_code == 200
    names = {m["name"] for m in (await client.get("/api/ps")).json()["models"]}
    assert names == {"llama3.2:latest", "nomic-embed-text:latest"}  # qwen was idlest
    assert (await _stats(client))["loads"] == 3


async def test_ps_has_ollamas_shape_and_order(app: SimulatorApp) -> None:
    app.configure(loaded=["qwen2.5:0.5b"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        await c.post("/api/chat", json=_chat(keep_alive="1h"))
        models = (await c.get("/api/ps")).json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest", "qwen2.5:0.5b"]  # longest-lived first
    for entry in models:
        assert set(entry) == PS_FIELDS
        assert set(entry["details"]) == DETAILS_FIELDS
        assert entry["size_vram"] == entry["size"] > 0
        assert entry["expires_at"].endswith("Z")


async def test_preloaded_models_start_warm() -> None:
    sim = create_simulator_app(SimulatorConfig(loaded=("llama3.2",), load_seconds=5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim), base_url="http://s") as c:
        assert [m["name"] for m in (await c.get("/api/ps")).json()["models"]] == ["llama3.2:latest"]
        answer = (await c.post("/api/chat", json=_chat())).json()
        assert answer["load_duration"] == 1_000_000  # no 5 s load
        await c.post("/_sim/reset")
        assert [m["name"] for m in (await c.get("/api/ps")).json()["models"]] == ["llama3.2:latest"]


async def test_keep_alive_zero_unloads_after_the_request(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/chat", json=_chat(keep_alive=0))).status_code == 200
    assert (await client.get("/api/ps")).json() == {"models": []}


async def test_tokens_per_second_sets_the_reported_eval_duration(
    client: httpx.AsyncClient,
) -> None:
    answer = (await client.post("/api/chat", json=_chat())).json()
    assert answer["eval_count"] == 3
    assert answer["eval_duration"] == 3 * 10_000_000


@pytest.mark.parametrize(
    "change",
    [{"slots": 0}, {"max_queue": -1}, {"load_seconds": -1}, {"tokens_per_second": 0}],
)
async def test_bad_gpu_settings_are_400(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    assert (await client.post("/_sim/config", json=change)).status_code == 400


def test_environment_is_validated_too() -> None:
    with pytest.raises(msgspec.ValidationError):
        SimulatorConfig.from_env({"NZ_SIM_SLOTS": "0"})
    config = SimulatorConfig.from_env(
        {"NZ_SIM_SLOTS": "4", "NZ_SIM_LOADED": "a, b", "NZ_SIM_TOKENS_PER_SECOND": "40"}
    )
    assert (config.slots, config.loaded, config.token_delay_ms) == (4, ("a", "b"), 25.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (90, 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (-1, -1.0),
        ("-1m", -1.0),
        ("soon", 300.0),
        (2.9, 2.0),
    ],
)
def test_keep_alive_as_seconds(value: float | str | None, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds


class _Knobs:
    slots: int | None = 1
    max_queue = 4
    load_seconds = 0.0
    max_loaded: int | None = None


async def test_a_waiter_that_leaves_frees_its_place() -> None:
    gpu = GpuModel(_Knobs)
    assert await gpu.acquire("m") is True  # the first request loads it
    waiter = asyncio.ensure_future(gpu.acquire("m"))
    await asyncio.sleep(0)
    assert gpu.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gpu.waiting == 0
    gpu.release("m")
    assert await gpu.acquire("m") is False  # warm, and the slot was free


async def test_eviction_waits_while_every_loaded_model_is_busy() -> None:
    class OneModel(_Knobs):
        slots = None
        max_loaded = 1

    gpu = GpuModel(OneModel)
    await gpu.acquire("a")
    other = asyncio.ensure_future(gpu.acquire("b"))
    await asyncio.sleep(0)
    assert not other.done() and gpu.waiting == 1
    gpu.release("a")
    assert await other is True
    assert [name for name, _ in gpu.loaded()] == ["b"]


# ----------------------------------------------------------------- served by Granian


@pytest.fixture
def served_gpu() -> Iterator[str]:
    flags = ["--slots", "1", "--max-queue", "1", "--loaded", "llama3.2", "--chunks", "2"]
    with served_simulator(*flags) as base:
        yield base


async def _until(check: Any, client: httpx.AsyncClient) -> dict[str, Any]:
    for _ in range(500):
        stats = await _stats(client)
        if check(stats):
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"simulator never reached the state; last {stats}")


async def test_flags_reach_the_worker_and_a_client_leaving_the_queue_frees_it(
    served_gpu: str,
) -> None:
    async with httpx.AsyncClient(base_url=served_gpu, timeout=10) as client:
        models = (await client.get("/api/ps")).json()["models"]
        assert [m["name"] for m in models] == ["llama3.2:latest"]
        await client.post("/_sim/config", json={"failure": "hang_after", "failure_after": 1})
        async with client.stream("POST", "/api/chat", json=_chat(stream=True)) as holder:
            assert holder.status_code == 200  # holds the one slot, hanging after one chunk
            queued = asyncio.ensure_future(client.post("/api/chat", json=_chat()))
            await _until(lambda s: s["waiting"] == 1, client)
            # the queue (1) is full: Ollama's 503
            full = await client.post("/api/chat", json=_chat())
            assert full.status_code == 503 and full.json() == {"error": BUSY_MESSAGE}
            queued.cancel()  # the queued client leaves
            await _until(lambda s: s["waiting"] == 0 and s["cancelled"] == 1, client)
            again = asyncio.ensure_future(client.post("/api/chat", json=_chat()))
            await _until(lambda s: s["waiting"] == 1, client)  # its place was free again
            await client.post("/_sim/config", json={"failure": None})
        assert (await again).status_code == 200


async def test_busy_slot_seconds_add_up_the_slots_held(client: httpx.AsyncClient) -> None:
    assert (await _stats(client))["busy_slot_seconds"] == 0
    await client.post("/_sim/config", json={"slots": 2})
    started = time.monotonic()
    answers = await asyncio.gather(*(client.post("/api/chat", json=_chat()) for _ in range(4)))
    elapsed = time.monotonic() - started
    assert {a.status_code for a in answers} == {200}
    busy = (await _stats(client))["busy_slot_seconds"]
    # each of the 4 held a slot at least its 3 tokens at 100/s (a little slack for the
    # clock); together never more than the 2 slots for the whole time
    assert busy >= 4 * 0.03 * 0.9
    assert busy <= 2 * elapsed
    await client.post("/_sim/reset")
    assert (await _stats(client))["busy_slot_seconds"] == 0
