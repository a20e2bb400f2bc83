"""The Ollama simulator: shapes, deterministic counts, controls and failure modes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import ollama
import pytest

from neuronetz_gateway.simulator import (
    PROMPT_OVERHEAD,
    WORDS,
    SimulatorApp,
    SimulatorConfig,
    create_simulator_app,
    embedding_vector,
    simulated_pieces,
    simulated_text,
)
from neuronetz_gateway.simulator import __main__ as simulator_main
from neuronetz_gateway.simulator.app import ENVIRONMENT

FINAL_FIELDS = {
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def app() -> SimulatorApp:
    return create_simulator_app(SimulatorConfig())


@pytest.fixture
async def client(app: SimulatorApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


def _lines(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.text.endswith("\n")
    return [json.loads(line) for line in resp.text.splitlines()]


def _chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3.2", "messages": [{"role": "user", "content": content}], **extra}


# ----------------------------------------------------------------- information routes


async def test_version_tags_and_show(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/version")).json() == {"version": "0.9.0"}
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == [
        "llama3.2:latest",
        "qwen2.5:0.5b",
        "nomic-embed-text:latest",
    ]
    for entry in tags:
        assert entry["model"] == entry["name"]
        assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert len(entry["digest"]) == 64
        assert entry["size"] > 0
        assert set(entry["details"]) >= {
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
    assert tags[1]["details"]["parameter_size"] == "500M"

    show = (await client.post("/api/show", json={"model": "llama3.2"})).json()
    assert set(show) >= {"modelfile", "parameters", "template", "details", "model_info"}
    assert show["capabilities"] == ["completion", "tools"]
    assert show["model_info"]["general.architecture"] == "llama"
    embed_show = (await client.post("/api/show", json={"name": "nomic-embed-text"})).json()
    assert embed_show["capabilities"] == ["embedding"]


async def test_show_unknown_model(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/show", json={"model": "nope"})
    assert resp.status_code == 404
    assert resp.json() == {"error": "model 'nope' not found"}


async def test_ps_lists_models_after_use_and_keep_alive_zero_unloads(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/ps")).json() == {"models": []}
    await client.post("/api/chat", json=_chat_body(stream=False))
    running = (await client.get("/api/ps")).json()["models"]
    assert [m["name"] for m in running] == ["llama3.2:latest"]
    assert running[0]["size_vram"] == running[0]["size"]
    assert running[0]["expires_at"].endswith("Z")
    resp = await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": 0})
    assert resp.json()["done_reason"] == "unload"
    assert (await client.get("/api/ps")).json() == {"models": []}


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/pull")
    assert (resp.status_code, resp.text) == (404, "404 page not found")
    resp = await client.get("/api/chat")
    assert resp.status_code == 405
    assert (await client.get("/")).text == "Ollama is running"


# ----------------------------------------------------------------- chat and generate


async def test_chat_streams_by_default_with_deterministic_counts(
    client: httpx.AsyncClient,
) -> None:
    resp = await client.post(
        "/api/chat",
        json={
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "tell me a story"},
            ],
        },
    )
    lines = _lines(resp)
    assert len(lines) == 21
    chunks, final = lines[:-1], lines[-1]
    assert [c["message"]["content"] for c in chunks] == simulated_pieces(20)
    assert all(c["done"] is False and c["model"] == "llama3.2" for c in chunks)
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert set(final) >= FINAL_FIELDS
    assert final["eval_count"] == 20
    assert final["prompt_eval_count"] == 2 + 4 + PROMPT_OVERHEAD
    assert final["total_duration"] >= final["eval_duration"] + final["load_duration"]


async def test_generate_non_streaming(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/api/generate",
        json={"model": "qwen2.5:0.5b", "prompt": "why is the sky blue", "stream": False},
    )
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["response"] == simulated_text(20)
    assert body["response"].startswith("The quick brown fox")
    assert body["eval_count"] == 20
    assert body["prompt_eval_count"] == 5 + PROMPT_OVERHEAD
    assert body["done_reason"] == "stop"
    assert set(body) >= FINAL_FIELDS


async def test_generate_streaming_uses_response_field(client: httpx.AsyncClient) -> None:
    lines = _lines(await client.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"}))
    assert "".join(line["response"] for line in lines) == simulated_text(20)
    assert "message" not in lines[0]


async def test_num_predict_caps_the_chunks(client: httpx.AsyncClient) -> None:
    lines = _lines(await client.post("/api/chat", json=_chat_body(options={"num_predict": 5})))
    assert len(lines) == 6
    assert lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 5
    body = (
        await client.post(
            "/api/generate",
            json={
                "model": "llama3.2",
                "prompt": "x",
                "stream": False,
                "options": {"num_predict": 2.9},
            },
        )
    ).json()
    assert (body["eval_count"], body["done_reason"]) == (2, "length")
    # As in Ollama, what truncates below 1 is no limit at all.
    for unbounded in (0, 0.5, 1e-9, -1, 1e300):
        lines = _lines(
            await client.post("/api/chat", json=_chat_body(options={"num_predict": unbounded}))
        )
        assert (lines[-1]["eval_count"], lines[-1]["done_reason"]) == (20, "stop"), unbounded
    # A cap above the answer's length changes nothing.
    lines = _lines(await client.post("/api/chat", json=_chat_body(options={"num_predict": 50})))
    assert lines[-1]["done_reason"] == "stop"


async def test_stop_strings_cut_the_answer(client: httpx.AsyncClient) -> None:
    body = (
        await client.post(
            "/api/chat", json=_chat_body(stream=False, options={"stop": [" fox", "zzz"]})
        )
    ).json()
    assert body["message"]["content"] == "The quick brown"
    assert body["eval_count"] == 3
    assert body["done_reason"] == "stop"
    lines = _lines(await client.post("/api/chat", json=_chat_body(options={"stop": "ick"})))
    assert [c["message"]["content"] for c in lines[:-1]] == ["The", " qu"]


async def test_config_changes_the_chunk_count(client: httpx.AsyncClient) -> None:
    resp = await client.post("/_sim/config", json={"chunks": 3})
    assert resp.json()["chunks"] == 3
    lines = _lines(await client.post("/api/chat", json=_chat_body()))
    assert len(lines) == 4
    assert lines[-1]["eval_count"] == 3
    assert (await client.get("/_sim/config")).json()["chunks"] == 3
    resp = await client.post("/_sim/config", json={"chunkz": 3})
    assert resp.status_code == 400


async def test_tool_calls_for_weather(client: httpx.AsyncClient) -> None:
    other_tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    body = (
        await client.post(
            "/api/chat",
            json=_chat_body(
                "What is the Weather in Paris?", stream=False, tools=[other_tool, WEATHER_TOOL]
            ),
        )
    ).json()
    assert body["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}
    ]
    assert body["message"]["content"] == ""
    assert body["eval_count"] == 1
    lines = _lines(
        await client.post("/api/chat", json=_chat_body("weather?", tools=[WEATHER_TOOL]))
    )
    assert len(lines) == 2
    assert lines[0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert lines[1]["done"] is True
    # Without the trigger word, or without tools, it just talks.
    body = (
        await client.post("/api/chat", json=_chat_body("hi", stream=False, tools=[WEATHER_TOOL]))
    ).json()
    assert "tool_calls" not in body["message"]
    body = (await client.post("/api/chat", json=_chat_body("weather?", stream=False))).json()
    assert "tool_calls" not in body["message"]


async def test_format_json_and_schema(client: httpx.AsyncClient) -> None:
    body = (await client.post("/api/chat", json=_chat_body(stream=False, format="json"))).json()
    assert isinstance(json.loads(body["message"]["content"]), dict)
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["a", "b"]},
        },
    }
    lines = _lines(
        await client.post(
            "/api/generate", json={"model": "llama3.2", "prompt": "x", "format": schema}
        )
    )
    text = "".join(line["response"] for line in lines)
    assert json.loads(text) == {"name": "text", "age": 1, "tags": ["text"], "kind": "a"}
    assert lines[-1]["eval_count"] == len(lines) - 1 == 20


async def test_empty_prompt_loads_the_model(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/generate", json={"model": "llama3.2"})
    body = resp.json()
    assert (body["done"], body["done_reason"], body["response"]) == (True, "load", "")
    resp = await client.post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert resp.json()["done_reason"] == "load"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", _chat_body() | {"model": "ghost"}),
        ("/api/generate", {"model": "ghost", "prompt": "x"}),
        ("/api/embed", {"model": "ghost", "input": "x"}),
        ("/api/embeddings", {"model": "ghost", "prompt": "x"}),
    ],
)
async def test_unknown_model(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    resp = await client.post(path, json=body)
    assert resp.status_code == 404
    assert resp.json() == {"error": 'model "ghost" not found, try pulling it first'}


async def test_model_names_are_canonicalised(client: httpx.AsyncClient) -> None:
    for name in (
        "llama3.2",
        "LLAMA3.2:latest",
        "library/llama3.2",
        "registry.ollama.ai/library/llama3.2",
    ):
        resp = await client.post("/api/chat", json=_chat_body(stream=False) | {"model": name})
        assert resp.status_code == 200, name
        assert resp.json()["model"] == name  # Ollama echoes the name it was given


async def test_embedding_model_cannot_chat_and_missing_model(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/chat", json=_chat_body() | {"model": "nomic-embed-text"})
    assert resp.status_code == 400
    assert "does not support chat" in resp.json()["error"]
    resp = await client.post("/api/generate", json={"prompt": "x"})
    assert (resp.status_code, resp.json()) == (400, {"error": "model is required"})
    resp = await client.post("/api/chat", content=b"{nope")
    assert resp.status_code == 400


# ----------------------------------------------------------------- embeddings


async def test_embed(client: httpx.AsyncClient) -> None:
    body = (
        await client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a b c", "d"]})
    ).json()
    assert body["model"] == "nomic-embed-text"
    assert len(body["embeddings"]) == 2
    assert body["embeddings"][0] == embedding_vector("nomic-embed-text:latest", "a b c")
    assert body["embeddings"][0] != body["embeddings"][1]
    for vector in body["embeddings"]:
        assert len(vector) == 8
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, abs_tol=1e-4)
    assert body["prompt_eval_count"] == (3 + 1) + (1 + 1)
    assert {"total_duration", "load_duration"} <= set(body)
    single = (
        await client.post(
            "/api/embed", json={"model": "nomic-embed-text", "input": "a b c", "dimensions": 4}
        )
    ).json()
    assert len(single["embeddings"]) == 1
    assert len(single["embeddings"][0]) == 4
    legacy = (
        await client.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a b c"})
    ).json()
    assert legacy == {"embedding": body["embeddings"][0]}


# ----------------------------------------------------------------- recording and stats


async def test_requests_are_recorded_and_cleared(client: httpx.AsyncClient) -> None:
    await client.post("/api/chat", json=_chat_body(stream=False), headers={"X-Trace": "t1"})
    await client.get("/api/tags")
    recorded = (await client.get("/_sim/requests")).json()
    assert [(r["method"], r["path"]) for r in recorded] == [
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
    ]
    assert recorded[0]["headers"]["x-trace"] == "t1"
    assert recorded[0]["body"] == _chat_body(stream=False)
    assert recorded[1]["body"] is None
    assert (await client.delete("/_sim/requests")).status_code == 200
    assert (await client.get("/_sim/requests")).json() == []
    await client.post("/_sim/config", json={"record": False})
    await client.get("/api/tags")
    assert (await client.get("/_sim/requests")).json() == []


async def test_stats_count_completed(client: httpx.AsyncClient) -> None:
    await client.post("/api/chat", json=_chat_body())
    await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["active"], stats["completed"], stats["cancelled"]) == (0, 2, 0)


async def test_reset_restores_the_start(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"chunks": 2, "failure": "busy", "models": ["x:1"]})
    await client.get("/api/tags")
    config = (await client.post("/_sim/reset")).json()
    assert config["chunks"] == 20
    assert config["failure"] is None
    assert (await client.get("/_sim/requests")).json() == []
    assert len((await client.get("/api/tags")).json()["models"]) == 3


async def test_models_can_be_changed_at_run_time(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"models": ["phi4:14b"]})
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == ["phi4:14b"]
    assert tags[0]["details"]["parameter_size"] == "14.0B"
    assert (await client.post("/api/chat", json=_chat_body())).status_code == 404


def test_config_from_env() -> None:
    config = SimulatorConfig.from_env(
        {
            "NZ_SIM_CHUNKS": "5",
            "NZ_SIM_CHUNK_DELAY_MS": "20",
            "NZ_SIM_MODELS": "a:1, b:2 ,",
            "NZ_SIM_RECORD": "0",
        }
    )
    assert (config.chunks, config.chunk_delay_ms, config.models, config.record) == (
        5,
        20.0,
        ("a:1", "b:2"),
        False,
    )
    default = SimulatorConfig.from_env({})
    assert (default.chunks, default.chunk_delay_ms) == (20, 0.0)
    assert default.models == ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")


def test_every_flag_reaches_the_config_through_the_environment() -> None:
    argv = [
        "--chunks", "3", "--chunk-delay-ms", "1.5", "--models", "a, b", "--no-record",
        "--slots", "2", "--max-queue", "0", "--tokens-per-second", "40",
        "--load-seconds", "0.5", "--max-loaded", "1", "--loaded", "a",
    ]  # fmt: skip
    env = simulator_main._environment(simulator_main._parser().parse_args(argv))
    assert set(env) == {variable for variable, _ in ENVIRONMENT.values()}
    config = SimulatorConfig.from_env(env)
    assert msgspec.structs.asdict(config) == {
        **msgspec.structs.asdict(SimulatorConfig()),
        "chunks": 3,
        "chunk_delay_ms": 1.5,
        "models": ("a", "b"),
        "record": False,
        "slots": 2,
        "max_queue": 0,
        "tokens_per_second": 40.0,
        "load_seconds": 0.5,
        "max_loaded": 1,
        "loaded": ("a",),
    }
    assert simulator_main._environment(simulator_main._parser().parse_args([])) == {}


def test_deterministic_helpers() -> None:
    assert simulated_pieces(12) == [*WORDS, WORDS[0], WORDS[1]]
    assert simulated_text(3) == "The quick brown"
    assert embedding_vector("m", "x") == embedding_vector("m", "x")
    assert embedding_vector("m", "x") != embedding_vector("n", "x")


# ----------------------------------------------------------------- failure modes


async def test_busy(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"failure": "busy"})
    for path, body in [
        ("/api/chat", _chat_body()),
        ("/api/generate", {"model": "llama3.2", "prompt": "x"}),
        ("/api/embed", {"model": "nomic-embed-text", "input": "x"}),
    ]:
        resp = await client.post(path, json=body)
        assert resp.status_code == 503
        assert resp.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
    assert (await client.get("/api/tags")).status_code == 200


async def test_midstream_error(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/config", json={"failure": "midstream_error", "failure_after": 2})
    lines = _lines(await client.post("/api/chat", json=_chat_body()))
    assert len(lines) == 3
    assert [line["message"]["content"] for line in lines[:2]] == simulated_pieces(2)
    assert set(lines[2]) == {"error"}
    resp = await client.post("/api/chat", json=_chat_body(stream=False))
    assert resp.status_code == 500
    assert "error" in resp.json()
    # A short answer finishes before the failure point.
    lines = _lines(await client.post("/api/chat", json=_chat_body(options={"num_predict": 2})))
    assert lines[-1]["done"] is True


class _Connection:
    """Drives the ASGI app by hand, so the test decides when the client leaves."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = json.dumps(body).encode()
        self._delivered = False
        self.gone = asyncio.Event()
        self.parts: list[bytes] = []
        self.status: int | None = None
        self._progress = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self._delivered:
            self._delivered = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.parts.append(message.get("body", b""))
            self._progress.set()

    async def wait_for_parts(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.parts) < n:
                self._progress.clear()
                await self._progress.wait()

    def run(self, app: SimulatorApp, path: str = "/api/chat") -> asyncio.Task[None]:
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        return asyncio.create_task(app(scope, self.receive, self.send))  # type: ignore[arg-type]


async def test_hang_after_waits_for_the_client_and_counts_it_cancelled(app: SimulatorApp) -> None:
    app.configure(failure="hang_after", failure_after=2)
    conn = _Connection(_chat_body())
    task = conn.run(app)
    await conn.wait_for_parts(2)
    await asyncio.sleep(0.05)
    assert not task.done()
    assert len(conn.parts) == 2  # and nothing more while it hangs
    assert (app.stats.active, app.stats.cancelled) == (1, 0)
    conn.gone.set()
    await asyncio.wait_for(task, 5)
    assert (app.stats.active, app.stats.cancelled, app.stats.completed) == (0, 1, 0)


async def test_hang_without_streaming(app: SimulatorApp) -> None:
    app.configure(failure="hang_after", failure_after=0)
    conn = _Connection(_chat_body(stream=False))
    task = conn.run(app)
    await asyncio.sleep(0.05)
    assert conn.status is None
    conn.gone.set()
    await asyncio.wait_for(task, 5)
    assert app.stats.cancelled == 1


async def test_slow_stream_notices_the_client_leaving(app: SimulatorApp) -> None:
    app.configure(chunk_delay_ms=20, chunks=500)
    conn = _Connection(_chat_body())
    task = conn.run(app)
    await conn.wait_for_parts(2)
    started = time.monotonic()
    conn.gone.set()
    await asyncio.wait_for(task, 5)
    # 500 chunks at 20 ms would take 10 s; the client left after a few.
    assert time.monotonic() - started < 1
    assert len(conn.parts) < 10
    assert (app.stats.cancelled, app.stats.completed, app.stats.active) == (1, 0, 0)


async def test_chunk_delay_paces_the_stream(app: SimulatorApp) -> None:
    app.configure(chunk_delay_ms=10, chunks=5)
    conn = _Connection(_chat_body())
    started = time.monotonic()
    await asyncio.wait_for(conn.run(app), 5)
    assert time.monotonic() - started >= 0.05
    assert len(conn.parts) == 6
    assert app.stats.completed == 1


async def test_lifespan(app: SimulatorApp) -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# ----------------------------------------------------------------- the official client


async def test_official_ollama_client(app: SimulatorApp) -> None:
    client = ollama.AsyncClient(host="http://sim", transport=httpx.ASGITransport(app=app))
    listed = await client.list()
    assert listed.models[0].model == "llama3.2:latest"
    reply = await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == simulated_text(20)
    assert reply.eval_count == 20
    parts = [
        part async for part in await client.generate(model="llama3.2", prompt="hi", stream=True)
    ]
    assert parts[-1].done_reason == "stop"
    call = await client.chat(
        model="llama3.2",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
    )
    assert call.message.tool_calls is not None
    assert call.message.tool_calls[0].function.arguments["city"] == "Paris"
    embedded = await client.embed(model="nomic-embed-text", input="x")
    assert len(embedded.embeddings[0]) == 8
    shown = await client.show("llama3.2")
    assert shown.capabilities == ["completion", "tools"]
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="ghost", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404


# ----------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def served_simulator(*flags: str, **env: str) -> Iterator[str]:
    """``python -m neuronetz_gateway.simulator`` (Granian) on a free port; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuronetz_gateway.simulator", "--port", str(port), *flags],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{base}/api/version", timeout=0.5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def served() -> Iterator[str]:
    with served_simulator(NZ_SIM_CHUNKS="4") as base:
        yield base


def test_served_by_granian_notices_disconnects(served: str) -> None:
    with httpx.Client(base_url=served) as client:
        lines = client.post("/api/chat", json=_chat_body()).text.splitlines()
        assert len(lines) == 5  # NZ_SIM_CHUNKS=4 reached the worker
        client.post("/_sim/config", json={"failure": "hang_after", "failure_after": 1})
        with client.stream("POST", "/api/chat", json=_chat_body()) as resp:
            assert json.loads(next(resp.iter_lines()))["message"]["content"] == "The"
        deadline = time.monotonic() + 5
        while client.get("/_sim/stats").json()["cancelled"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/_sim/stats").json()["active"] == 0


async def test_scripted_replies_are_sent_verbatim_in_order(client: httpx.AsyncClient) -> None:
    lines = ['{"message": {"content": "a"}, "done": false}', {"done": True, "eval_count": 1}]
    script = [{"lines": lines, "split": 4}, {"body": {"response": "b", "done": True}}]
    assert (await client.post("/_sim/config", json={"script": script})).status_code == 200
    first = await client.post("/api/chat", json=_chat_body())
    assert first.headers["content-type"] == "application/x-ndjson"
    assert first.content == (lines[0] + '\n{"done":true,"eval_count":1}\n').encode()
    second = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert second.json() == {"response": "b", "done": True}
    third = await client.post("/api/chat", json=_chat_body(stream=False))
    assert third.json()["message"]["content"] == simulated_text(20)  # the script is used up
    recorded = await client.get("/_sim/requests")
    assert [r["path"] for r in recorded.json()] == ["/api/chat", "/api/generate", "/api/chat"]
    bad = await client.post("/_sim/config", json={"script": [{"lines": [], "nope": 1}]})
    assert bad.status_code == 400
