"""The Ollama simulator: a raw ASGI app imitating Ollama's native API.

Raw ASGI rather than a framework because the simulator is the floor of the
benchmarks: it must cost less than anything measured in front of it.

Deterministic by design, so tests can predict every number:

- a streamed answer is ``chunks`` NDJSON lines of one "token" each (the
  words of :data:`~.content.WORDS`, cycled), so ``eval_count`` = the chunks
  emitted;
- ``prompt_eval_count`` = whitespace-separated words of the prompt (all
  message contents, or system + prompt + suffix) +
  :data:`~.content.PROMPT_OVERHEAD`;
- ``options.num_predict`` caps the chunks (``done_reason: "length"``; as in
  Ollama, a value that truncates below 1, such as ``0`` or ``0.5``, is no cap) and
  ``options.stop`` cuts the text at the first stop string;
- chat with ``think`` set (``true`` or a level) first streams the words of
  :data:`THINKING` as ``message.thinking`` (counted in ``eval_count``);
- chat with ``tools`` whose last user message mentions "weather" answers
  with one tool call; ``format`` answers a JSON document (split over the
  chunks);
- embeddings are unit vectors derived from a hash of model and text.

Test controls live under ``/_sim/``: ``GET|POST /_sim/config`` (chunks,
delay, models, failure modes, and ``script``: verbatim answers for the next
model requests, see :class:`ScriptedReply`), ``GET|DELETE /_sim/requests`` (the recorded
requests), ``GET /_sim/stats`` (active, completed, cancelled) and
``POST /_sim/reset``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Annotated, Any, Literal, NoReturn, Protocol, TypeVar

import msgspec

from neuronetz_gateway.simulator.catalogue import SimulatedModel, canonical_name
from neuronetz_gateway.simulator.content import (
    EMBEDDING_DIMENSIONS,
    PROMPT_OVERHEAD,
    WORDS,
    apply_stop,
    count_words,
    embedding_vector,
    example_value,
    json_document,
    simulated_pieces,
    split_text,
    timestamp,
)
from neuronetz_gateway.simulator.gpu import (
    BUSY_MESSAGE,
    GpuModel,
    ServerBusy,
    keep_alive_seconds,
)

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_MODELS",
    "ENVIRONMENT",
    "MIDSTREAM_ERROR_MESSAGE",
    "THINKING",
    "RecordedRequest",
    "ScriptedReply",
    "SimulatorApp",
    "SimulatorConfig",
    "SimulatorStats",
    "create_simulator_app",
]

_T = TypeVar("_T")


class _ModelBody(Protocol):
    model: str


_M = TypeVar("_M", bound=_ModelBody)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

VERSION = "0.9.0"
DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")
TOOL_CALL_EVAL_COUNT = 1
#: The thinking of a chat request with ``think`` set, one piece per chunk.
THINKING = ("Let", " me", " think", ".")
MIDSTREAM_ERROR_MESSAGE = "simulated failure: the model runner stopped unexpectedly"
_RECORD_LIMIT = 10_000

FailureMode = Literal["busy", "midstream_error", "hang_after"]


class ScriptedReply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One answer the next model request gets verbatim, instead of a simulated one.

    ``lines``: an NDJSON stream, each item a JSON value (encoded compactly) or
    a string sent as it is, each followed by ``\n``; ``body``: one JSON body
    (a value, or a string sent as it is). ``split``: send the stream in reads
    of this many bytes (0: one read per line), so lines arrive cut anywhere.
    Tests use it for what the simulator does not produce itself: thinking,
    logprobs, tool-call ids, other servers' spellings of the same JSON.
    """

    lines: list[Any] | None = None
    body: Any = None
    status: int = 200
    split: int = 0


class SimulatorConfig(msgspec.Struct, kw_only=True):
    """The simulator's knobs; every field can be changed at run time via ``/_sim/config``."""

    chunks: int = 20
    chunk_delay_ms: float = 0.0
    models: tuple[str, ...] = DEFAULT_MODELS
    #: ``busy``: 503 for every model request; ``midstream_error``: an error
    #: line after ``failure_after`` chunks; ``hang_after``: silence after
    #: ``failure_after`` chunks until the client goes away.
    failure: FailureMode | None = None
    failure_after: int = 3
    #: Recording costs a little per request; benchmarks turn it off.
    record: bool = True
    #: Answers for the next model requests, first one first (see ScriptedReply).
    script: list[ScriptedReply] = msgspec.field(default_factory=list)
    #: The GPU (module :mod:`.gpu`): parallel requests per loaded model
    #: (``OLLAMA_NUM_PARALLEL``; ``None``: unlimited), requests that may wait
    #: (``OLLAMA_MAX_QUEUE``), seconds a cold load takes, models loaded at
    #: once (``OLLAMA_MAX_LOADED_MODELS``; ``None``: unlimited), and the
    #: models loaded at start-up.
    slots: int | None = None
    max_queue: int = 512
    load_seconds: float = 0.0
    max_loaded: int | None = None
    loaded: tuple[str, ...] = ()
    #: Generation speed; when set it replaces ``chunk_delay_ms`` (one chunk is one token).
    tokens_per_second: float | None = None

    @property
    def token_delay_ms(self) -> float:
        """The delay before each chunk, from ``tokens_per_second`` or ``chunk_delay_ms``."""
        if self.tokens_per_second:
            return 1000.0 / self.tokens_per_second
        return self.chunk_delay_ms

    @property
    def may_wait(self) -> bool:
        """Whether a model request can wait here (then the client's departure is watched)."""
        return (
            self.token_delay_ms > 0
            or self.slots is not None
            or self.load_seconds > 0
            or self.max_loaded is not None
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SimulatorConfig:
        """The defaults, overridden by the ``NZ_SIM_*`` environment variables."""
        env = os.environ if env is None else env
        values = {
            field: parse(raw)
            for field, (variable, parse) in ENVIRONMENT.items()
            if (raw := env.get(variable))
        }
        # the same bounds as a run-time change (a zero slot count would hang everything)
        msgspec.convert(values, _ConfigUpdate)
        return msgspec.structs.replace(cls(), **values)


def _names(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


def _switch(value: str) -> bool:
    return value.strip().lower() not in {"0", "false", "no", "off"}


#: The knobs read at start-up: field -> its environment variable and how to read it
#: (``python -m neuronetz_gateway.simulator`` sets them from its flags of the field's name).
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "chunks": ("NZ_SIM_CHUNKS", int),
    "chunk_delay_ms": ("NZ_SIM_CHUNK_DELAY_MS", float),
    "models": ("NZ_SIM_MODELS", _names),
    "record": ("NZ_SIM_RECORD", _switch),
    "slots": ("NZ_SIM_SLOTS", int),
    "max_queue": ("NZ_SIM_MAX_QUEUE", int),
    "load_seconds": ("NZ_SIM_LOAD_SECONDS", float),
    "max_loaded": ("NZ_SIM_MAX_LOADED", int),
    "loaded": ("NZ_SIM_LOADED", _names),
    "tokens_per_second": ("NZ_SIM_TOKENS_PER_SECOND", float),
}


_Positive = Annotated[int, msgspec.Meta(ge=1)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0)]
_PositiveRate = Annotated[float, msgspec.Meta(gt=0)]


class _ConfigUpdate(msgspec.Struct, forbid_unknown_fields=True):
    chunks: int | msgspec.UnsetType = msgspec.UNSET
    chunk_delay_ms: float | msgspec.UnsetType = msgspec.UNSET
    models: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
    failure: FailureMode | msgspec.UnsetType | None = msgspec.UNSET
    failure_after: int | msgspec.UnsetType = msgspec.UNSET
    record: bool | msgspec.UnsetType = msgspec.UNSET
    script: list[ScriptedReply] | msgspec.UnsetType = msgspec.UNSET
    slots: _Positive | msgspec.UnsetType | None = msgspec.UNSET
    max_queue: _NonNegative | msgspec.UnsetType = msgspec.UNSET
    load_seconds: _NonNegativeSeconds | msgspec.UnsetType = msgspec.UNSET
    max_loaded: _Positive | msgspec.UnsetType | None = msgspec.UNSET
    loaded: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
    tokens_per_second: _PositiveRate | msgspec.UnsetType | None = msgspec.UNSET


class SimulatorStats(msgspec.Struct):
    """Counters for tests: model requests in flight, finished, and cut off by the client.

    ``peak_active``: the most that ran at once; ``waiting``: queued now for
    a slot or a load; ``loads``: cold loads; ``busy``: 503s for a full queue;
    ``busy_slot_seconds``: slots held, integrated over time (a request holds
    one from its admission, after any cold load, to its end), so that a
    benchmark reads a GPU's utilisation from the GPU's side;
    ``eviction_waits``: requests whose model could not load until another
    model's requests had finished (every loaded model busy).
    """

    active: int = 0
    completed: int = 0
    cancelled: int = 0
    requests: int = 0
    peak_active: int = 0
    waiting: int = 0
    loads: int = 0
    busy: int = 0
    busy_slot_seconds: float = 0.0
    eviction_waits: int = 0


class RecordedRequest(msgspec.Struct):
    """One request as the simulator saw it (body parsed as JSON when it is JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class _Raw(msgspec.Struct):
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


# ---------------------------------------------------------------- request bodies (views)


class _Options(msgspec.Struct):
    # Ollama takes every JSON number as float64 and truncates it to int64
    num_predict: float | None = None
    stop: str | list[str] | None = None


def _whole(value: float | None) -> int | None:
    """Go's ``int64(v)`` for a JSON number; ``None`` when absent or out of range."""
    if value is None or not -(2.0**63) <= value < 2.0**63:
        return None
    return int(value)


class _InMessage(msgspec.Struct):
    role: str = "user"
    content: str | None = None


class _ChatBody(msgspec.Struct):
    model: str = ""
    messages: list[_InMessage] = msgspec.field(default_factory=list)
    stream: bool | None = None
    options: _Options | None = None
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None


class _GenerateBody(msgspec.Struct):
    model: str = ""
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    stream: bool | None = None
    options: _Options | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None


class _EmbedBody(msgspec.Struct):
    model: str = ""
    input: str | list[str] = ""
    dimensions: int | None = None
    keep_alive: float | str | None = None


class _EmbeddingsBody(msgspec.Struct):
    model: str = ""
    prompt: str = ""


class _ShowBody(msgspec.Struct):
    model: str = ""
    name: str = ""


_encode = msgspec.json.Encoder().encode
_chat_decoder = msgspec.json.Decoder(_ChatBody)
_generate_decoder = msgspec.json.Decoder(_GenerateBody)
_embed_decoder = msgspec.json.Decoder(_EmbedBody)
_embeddings_decoder = msgspec.json.Decoder(_EmbeddingsBody)
_show_decoder = msgspec.json.Decoder(_ShowBody)
_config_decoder = msgspec.json.Decoder(_ConfigUpdate)
_any_decoder = msgspec.json.Decoder()

_JSON = b"application/json; charset=utf-8"
_NDJSON = b"application/x-ndjson"
_TEXT = b"text/plain; charset=utf-8"
_ENCODED_WORDS = tuple(_encode(w) for w in WORDS)
#: How far ahead ``/api/ps`` puts the expiry of a model pinned by a negative keep_alive.
_PINNED_SECONDS = 10 * 365 * 86400.0


# ---------------------------------------------------------------- ASGI plumbing


class _ClientGone(Exception):
    """The client went away while we were sending."""


def _model_not_found(model: str) -> tuple[int, bytes]:
    return 404, _encode({"error": f'model "{model}" not found, try pulling it first'})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; ``None`` when the client left first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_part(send: Send, body: bytes, *, more: bool = True) -> None:
    # Servers differ in how a write to a closed connection fails (OSError,
    # RuntimeError, their own class); all of them mean the same here.
    try:
        await send({"type": "http.response.body", "body": body, "more_body": more})
    except Exception as exc:
        raise _ClientGone from exc


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Departure:
    """Watches ``receive`` for the client leaving while a slow answer is written.

    Granian does not fail a write to a closed connection (it drops it), so
    a delayed stream would run to its end unnoticed without this watch.
    """

    __slots__ = ("_task",)

    def __init__(self, receive: Receive) -> None:
        self._task = asyncio.ensure_future(_wait_for_disconnect(receive))

    async def pause(self, seconds: float) -> None:
        """Sleep; raise :class:`_ClientGone` as soon as the client leaves."""
        done, _ = await asyncio.wait((self._task,), timeout=seconds)
        if done:
            raise _ClientGone

    async def race(self, waiting: Awaitable[_T]) -> _T:
        """Await ``waiting``; raise :class:`_ClientGone` if the client leaves first."""
        task = asyncio.ensure_future(waiting)
        done, _ = await asyncio.wait((task, self._task), return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise _ClientGone

    async def hang(self) -> NoReturn:
        """Wait for the client to leave, then raise :class:`_ClientGone`."""
        await asyncio.wait((self._task,))
        raise _ClientGone

    def close(self) -> None:
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # retrieved, so asyncio does not log it
        else:
            self._task.cancel()


async def _hang(receive: Receive, departure: _Departure | None) -> NoReturn:
    if departure is not None:
        await departure.hang()
    await _wait_for_disconnect(receive)
    raise _ClientGone


Handler = Callable[["SimulatorApp", bytes, Receive, Send], Awaitable[None]]


class SimulatorApp:
    """The simulator as an ASGI callable, with its state on the instance."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig.from_env()
        self._initial = msgspec.structs.replace(self.config)
        self.stats = SimulatorStats()
        self._active_since = time.monotonic()
        self._recorded: deque[_Raw] = deque(maxlen=_RECORD_LIMIT)
        self._models: dict[str, SimulatedModel] = {}
        self._tags_body = b""
        self.gpu = GpuModel(lambda: self.config)
        self._rebuild_catalogue()
        self._preload()

    # -- configuration -------------------------------------------------------

    def _rebuild_catalogue(self) -> None:
        self._models = {
            m.canonical: m for m in (SimulatedModel(name) for name in self.config.models)
        }
        self._tags_body = _encode({"models": [m.entry for m in self._models.values()]})
        self.gpu.forget_missing(set(self._models))

    def _preload(self) -> None:
        self.gpu.preload(
            [c for c in (canonical_name(n) for n in self.config.loaded) if c in self._models]
        )

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change the configuration at run time (what ``POST /_sim/config`` does)."""
        return self._apply(msgspec.convert(changes, _ConfigUpdate))

    def _apply(self, update: _ConfigUpdate) -> SimulatorConfig:
        for field in update.__struct_fields__:
            value = getattr(update, field)
            if value is not msgspec.UNSET:
                setattr(self.config, field, value)
        if update.models is not msgspec.UNSET:
            self._rebuild_catalogue()
        if update.loaded is not msgspec.UNSET:
            self._preload()
        self.gpu.knobs_changed()
        return self.config

    def reset(self) -> None:
        """Back to the start-up configuration, with no recordings and zeroed stats."""
        self.config = msgspec.structs.replace(self._initial)
        self.stats = SimulatorStats()
        self._active_since = time.monotonic()
        self._recorded.clear()
        self.gpu.reset()
        self._rebuild_catalogue()
        self._preload()

    def recorded_requests(self) -> list[RecordedRequest]:
        """The recorded requests, oldest first, bodies parsed as JSON where they are JSON."""
        out = []
        for raw in self._recorded:
            body: Any = None
            if raw.body:
                try:
                    body = _any_decoder.decode(raw.body)
                except msgspec.DecodeError:
                    body = raw.body.decode("utf-8", "replace")
            headers: dict[str, str] = {}
            for key, value in raw.headers:
                name = key.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[name] = f"{headers[name]}, {text}" if name in headers else text
            out.append(RecordedRequest(raw.method, raw.path, headers, body))
        return out

    # -- ASGI ----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        routes = _ROUTES.get(path)
        if routes is None:
            await _respond(send, 404, b"404 page not found", _TEXT)
            return
        handler = routes.get("GET" if method == "HEAD" else method)
        if handler is None:
            await _respond(send, 405, b"405 method not allowed", _TEXT)
            return
        body = await _read_body(receive)
        if body is None:
            return
        self.stats.requests += 1
        if self.config.record and not path.startswith("/_sim/"):
            self._recorded.append(_Raw(method, path, list(scope["headers"]), body))
        if self.config.script and path in _SCRIPTABLE:
            await self._scripted(self.config.script.pop(0), send)
            return
        await handler(self, body, receive, send)

    async def _scripted(self, reply: ScriptedReply, send: Send) -> None:
        """Send a scripted answer as it was written."""
        self.stats.completed += 1
        if reply.lines is None:
            body = reply.body if isinstance(reply.body, str) else _encode(reply.body).decode()
            await _respond(send, reply.status, body.encode())
            return
        data = b"".join(
            (line.encode() if isinstance(line, str) else _encode(line)) + b"\n"
            for line in reply.lines
        )
        if reply.split > 0:
            pieces = [data[i : i + reply.split] for i in range(0, len(data), reply.split)]
        else:
            pieces = [piece + b"\n" for piece in data.split(b"\n")[:-1]]
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(b"content-type", _NDJSON)],
            }
        )
        for piece in pieces:
            await _send_part(send, piece)
        await _send_part(send, b"", more=False)

    # -- information routes --------------------------------------------------

    async def _root(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond(send, 200, b"Ollama is running", _TEXT)

    async def _version(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond(send, 200, _encode({"version": VERSION}))

    async def _tags(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self._tags_body)

    async def _ps(self, body: bytes, receive: Receive, send: Send) -> None:
        # Ollama's ProcessResponse (api/types.go), longest-lived first as its PsHandler sorts
        now = time.time()
        running = []
        for canonical, until in self.gpu.loaded():
            model = self._models.get(canonical)
            if model is None:
                continue
            entry = dict(model.entry)
            del entry["modified_at"]
            entry["expires_at"] = timestamp(min(until - now, _PINNED_SECONDS))
            entry["size_vram"] = entry["size"]
            entry["context_length"] = 4096
            running.append(entry)
        await _respond(send, 200, _encode({"models": running}))

    async def _show(self, body: bytes, receive: Receive, send: Send) -> None:
        req = self._decode(_show_decoder, body)
        if req is None:
            await _respond(send, 400, _encode({"error": "invalid JSON body"}))
            return
        name = req.model or req.name
        model = self._models.get(canonical_name(name))
        if model is None:
            await _respond(send, 404, _encode({"error": f"model '{name}' not found"}))
            return
        await _respond(send, 200, _encode(model.show()))

    # -- model routes --------------------------------------------------------

    def _decode(self, decoder: msgspec.json.Decoder[_T], body: bytes) -> _T | None:
        try:
            return decoder.decode(body or b"{}")
        except msgspec.DecodeError:
            return None

    async def _model_request(
        self, decoder: msgspec.json.Decoder[_M], body: bytes, send: Send, kind: str
    ) -> tuple[_M, SimulatedModel] | None:
        """The request and its model; otherwise Ollama's 400/404 is sent and ``None`` returned."""
        req = self._decode(decoder, body)
        if req is None:
            await _respond(send, 400, _encode({"error": f"invalid {kind} request body"}))
            return None
        model, error = self._lookup(req.model)
        if error or model is None:
            await _respond(send, *(error or _model_not_found(req.model)))
            return None
        return req, model

    async def _answered_busy(self, send: Send) -> bool:
        """In the ``busy`` failure mode, answer Ollama's 503 and say so."""
        if self.config.failure != "busy":
            return False
        await _respond(send, 503, _encode({"error": BUSY_MESSAGE}))
        return True

    def _lookup(self, name: str) -> tuple[SimulatedModel | None, tuple[int, bytes] | None]:
        """The model, or the error answer Ollama gives for it."""
        if not name:
            return None, (400, _encode({"error": "model is required"}))
        model = self._models.get(canonical_name(name))
        if model is None:
            return None, _model_not_found(name)
        return model, None

    async def _on_gpu(
        self,
        receive: Receive,
        send: Send,
        model: SimulatedModel,
        keep_alive: float,
        work: Callable[[_Departure | None, bool], Awaitable[None]],
    ) -> None:
        """Run ``work(departure, cold)`` holding one of the model's slots (see :mod:`.gpu`).

        A full queue is Ollama's 503; a client that leaves while queued is
        counted as cancelled and never runs.
        """
        departure = _Departure(receive) if self.config.may_wait else None
        try:
            try:
                cold = await self.gpu.acquire(
                    model.canonical, departure.race if departure is not None else None
                )
            except ServerBusy:
                self.stats.busy += 1
                await _respond(send, 503, _encode({"error": BUSY_MESSAGE}))
                return
            except _ClientGone:
                self.stats.cancelled += 1
                return
            self._count_busy()
            self.stats.active += 1
            self.stats.peak_active = max(self.stats.peak_active, self.stats.active)
            try:
                await work(departure, cold)
            finally:
                self._count_busy()
                self.stats.active -= 1
                self.gpu.release(model.canonical, keep_alive)
        finally:
            if departure is not None:
                departure.close()

    def _count_busy(self) -> None:
        """Add the slots held since the last change to ``busy_slot_seconds``."""
        now = time.monotonic()
        self.stats.busy_slot_seconds += self.stats.active * (now - self._active_since)
        self._active_since = now

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> None:
        found = await self._model_request(_chat_decoder, body, send, "chat")
        if found is None:
            return
        req, model = found
        if model.embedding:
            await _respond(send, 400, _encode({"error": f'"{req.model}" does not support chat'}))
            return
        stream = req.stream is not False
        keep_alive = keep_alive_seconds(req.keep_alive)
        if not req.messages:
            await self._answer_load(receive, send, model, req.model, keep_alive, chat=True)
            return
        prompt_count = count_words(*(m.content for m in req.messages)) + PROMPT_OVERHEAD
        last_user = next((m.content or "" for m in reversed(req.messages) if m.role == "user"), "")
        if req.tools and "weather" in last_user.lower():
            await self._answer_tool_call(
                receive, send, model, keep_alive, req, prompt_count, stream=stream
            )
            return
        await self._answer(
            receive,
            send,
            model,
            keep_alive,
            req.model,
            req.options,
            req.format,
            prompt_count,
            stream=stream,
            chat=True,
            thinking=THINKING if req.think not in (None, False) else (),
        )

    async def _generate(self, body: bytes, receive: Receive, send: Send) -> None:
        found = await self._model_request(_generate_decoder, body, send, "generate")
        if found is None:
            return
        req, model = found
        if model.embedding:
            await _respond(
                send, 400, _encode({"error": f'"{req.model}" does not support generate'})
            )
            return
        keep_alive = keep_alive_seconds(req.keep_alive)
        if not req.prompt:
            await self._answer_load(receive, send, model, req.model, keep_alive, chat=False)
            return
        prompt_count = count_words(req.system, req.prompt, req.suffix) + PROMPT_OVERHEAD
        await self._answer(
            receive,
            send,
            model,
            keep_alive,
            req.model,
            req.options,
            req.format,
            prompt_count,
            stream=req.stream is not False,
            chat=False,
        )

    async def _answer_load(
        self,
        receive: Receive,
        send: Send,
        model: SimulatedModel,
        name: str,
        keep_alive: float,
        *,
        chat: bool,
    ) -> None:
        """An empty prompt loads the model (``keep_alive`` 0: unloads it); one line, at once."""

        async def answer(_departure: _Departure | None, _cold: bool) -> None:
            await self._load_line(send, name, "load", chat=chat)

        if keep_alive == 0:
            self.gpu.unload(model.canonical)
            await self._load_line(send, name, "unload", chat=chat)
            return
        await self._on_gpu(receive, send, model, keep_alive, answer)

    async def _load_line(self, send: Send, model: str, reason: str, *, chat: bool) -> None:
        # Ollama answers an empty prompt at once, streaming or not, with one line.
        body: dict[str, Any] = {"model": model, "created_at": timestamp()}
        if chat:
            body["message"] = {"role": "assistant", "content": ""}
        else:
            body["response"] = ""
        body["done"] = True
        body["done_reason"] = reason
        await _respond(send, 200, _encode(body))

    def _load_ns(self, cold: bool) -> int:
        return (
            int(self.config.load_seconds * 1e9) if cold and self.config.load_seconds else 1_000_000
        )

    def _final(
        self, model: str, chat: bool, reason: str, prompt_count: int, eval_count: int, load_ns: int
    ) -> dict[str, Any]:
        delay_ns = int(self.config.token_delay_ms * 1e6)
        prompt_ns = prompt_count * 100_000
        eval_ns = eval_count * max(delay_ns, 1_000_000)
        body: dict[str, Any] = {"model": model, "created_at": timestamp()}
        if chat:
            body["message"] = {"role": "assistant", "content": ""}
        else:
            body["response"] = ""
        body.update(
            done=True,
            done_reason=reason,
            total_duration=load_ns + prompt_ns + eval_ns,
            load_duration=load_ns,
            prompt_eval_count=prompt_count,
            prompt_eval_duration=prompt_ns,
            eval_count=eval_count,
            eval_duration=eval_ns,
        )
        return body

    async def _answer(
        self,
        receive: Receive,
        send: Send,
        found: SimulatedModel,
        keep_alive: float,
        model: str,
        options: _Options | None,
        fmt: str | dict[str, Any] | None,
        prompt_count: int,
        *,
        stream: bool,
        chat: bool,
        thinking: tuple[str, ...] = (),
    ) -> None:
        config = self.config
        if await self._answered_busy(send):
            return
        if fmt:
            pieces = split_text(json_document(fmt), config.chunks)
        else:
            pieces = simulated_pieces(config.chunks)
        pieces, stopped = apply_stop(pieces, options.stop if options else None)
        # A piece cut by a stop string is no longer one of the pre-encoded words.
        plain = not fmt and not stopped
        reason = "stop"
        num_predict = _whole(options.num_predict) if options else None
        # as in Ollama, below 1 (0, 0.5, -1) is no limit at all
        if num_predict is not None and 1 <= num_predict < len(pieces):
            pieces = pieces[:num_predict]
            plain = not fmt  # the cut piece, if any, was the last one: now dropped
            reason = "length"

        async def run(departure: _Departure | None, cold: bool) -> None:
            load_ns = self._load_ns(cold)
            try:
                if stream:
                    await self._stream(
                        receive,
                        send,
                        departure,
                        model,
                        pieces,
                        reason,
                        prompt_count,
                        load_ns,
                        chat=chat,
                        plain=plain,
                        thinking=thinking,
                    )
                else:
                    await self._single(
                        receive,
                        send,
                        departure,
                        model,
                        pieces,
                        reason,
                        prompt_count,
                        load_ns,
                        chat=chat,
                        thinking=thinking,
                    )
            except _ClientGone:
                self.stats.cancelled += 1
            except asyncio.CancelledError:
                # Some servers cancel the app's task when the client disconnects.
                self.stats.cancelled += 1
                raise
            else:
                self.stats.completed += 1

        await self._on_gpu(receive, send, found, keep_alive, run)

    async def _single(
        self,
        receive: Receive,
        send: Send,
        departure: _Departure | None,
        model: str,
        pieces: list[str],
        reason: str,
        prompt_count: int,
        load_ns: int,
        *,
        chat: bool,
        thinking: tuple[str, ...] = (),
    ) -> None:
        config = self.config
        failure_at = config.failure_after if config.failure else None
        if failure_at is not None and failure_at < len(pieces):
            if config.failure == "hang_after":
                await _hang(receive, departure)
            await _respond(send, 500, _encode({"error": MIDSTREAM_ERROR_MESSAGE}))
            return
        if departure is not None:
            await departure.pause(config.token_delay_ms * len(pieces) / 1000)
        body = self._final(model, chat, reason, prompt_count, len(thinking) + len(pieces), load_ns)
        text = "".join(pieces)
        if chat:
            body["message"]["content"] = text
            if thinking:
                body["message"]["thinking"] = "".join(thinking)
        else:
            body["response"] = text
        await _respond(send, 200, _encode(body))

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        departure: _Departure | None,
        model: str,
        pieces: list[str],
        reason: str,
        prompt_count: int,
        load_ns: int,
        *,
        chat: bool,
        plain: bool,
        thinking: tuple[str, ...] = (),
    ) -> None:
        config = self.config
        delay = config.token_delay_ms / 1000
        failure_at = config.failure_after if config.failure else None
        # Every chunk of this answer is the same bytes around its text.
        head = b'{"model":' + _encode(model) + b',"created_at":' + _encode(timestamp())
        if chat:
            prefix = head + b',"message":{"role":"assistant","content":'
            suffix = b'},"done":false}\n'
        else:
            prefix = head + b',"response":'
            suffix = b',"done":false}\n'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", _NDJSON)],
            }
        )
        for piece in thinking:
            line = head + b',"message":{"role":"assistant","content":"","thinking":'
            await _send_part(send, line + _encode(piece) + b'},"done":false}\n')
        for i, piece in enumerate(pieces):
            if i == failure_at:
                if config.failure == "hang_after":
                    await _hang(receive, departure)
                line = _encode({"error": MIDSTREAM_ERROR_MESSAGE}) + b"\n"
                await _send_part(send, line, more=False)
                return
            if departure is not None:
                await departure.pause(delay)
            text = _ENCODED_WORDS[i % len(WORDS)] if plain else _encode(piece)
            await _send_part(send, prefix + text + suffix)
        final = self._final(model, chat, reason, prompt_count, len(thinking) + len(pieces), load_ns)
        await _send_part(send, _encode(final) + b"\n", more=False)

    async def _answer_tool_call(
        self,
        receive: Receive,
        send: Send,
        model: SimulatedModel,
        keep_alive: float,
        req: _ChatBody,
        prompt_count: int,
        *,
        stream: bool,
    ) -> None:
        if await self._answered_busy(send):
            return
        tools = req.tools or []
        chosen = next(
            (t for t in tools if "weather" in str(t.get("function", {}).get("name", ""))),
            tools[0],
        )
        function = chosen.get("function") or {}
        arguments = example_value("", function.get("parameters") or {})
        call = {"function": {"name": function.get("name", ""), "arguments": arguments}}

        async def answer(_departure: _Departure | None, cold: bool) -> None:
            final = self._final(
                req.model, True, "stop", prompt_count, TOOL_CALL_EVAL_COUNT, self._load_ns(cold)
            )
            self.stats.completed += 1
            if not stream:
                final["message"]["tool_calls"] = [call]
                await _respond(send, 200, _encode(final))
                return
            first = {
                "model": req.model,
                "created_at": final["created_at"],
                "message": {"role": "assistant", "content": "", "tool_calls": [call]},
                "done": False,
            }
            body = _encode(first) + b"\n" + _encode(final) + b"\n"
            await _respond(send, 200, body, _NDJSON)

        await self._on_gpu(receive, send, model, keep_alive, answer)

    async def _embed(self, body: bytes, receive: Receive, send: Send) -> None:
        found = await self._model_request(_embed_decoder, body, send, "embed")
        if found is None:
            return
        req, model = found
        if await self._answered_busy(send):
            return
        inputs = [req.input] if isinstance(req.input, str) else req.input
        inputs = [text for text in inputs if text]
        dimensions = req.dimensions or EMBEDDING_DIMENSIONS
        prompt_count = sum(count_words(text) + 1 for text in inputs)

        async def answer(_departure: _Departure | None, cold: bool) -> None:
            load_ns = self._load_ns(cold)
            self.stats.completed += 1
            vectors = [embedding_vector(model.canonical, t, dimensions) for t in inputs]
            await _respond(
                send,
                200,
                _encode(
                    {
                        "model": req.model,
                        "embeddings": vectors,
                        "total_duration": load_ns + prompt_count * 100_000,
                        "load_duration": load_ns,
                        "prompt_eval_count": prompt_count,
                    }
                ),
            )

        await self._on_gpu(receive, send, model, keep_alive_seconds(req.keep_alive), answer)

    async def _embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        found = await self._model_request(_embeddings_decoder, body, send, "embeddings")
        if found is None:
            return
        req, model = found
        if await self._answered_busy(send):
            return

        async def answer(_departure: _Departure | None, _cold: bool) -> None:
            vector = embedding_vector(model.canonical, req.prompt) if req.prompt else []
            self.stats.completed += 1
            await _respond(send, 200, _encode({"embedding": vector}))

        await self._on_gpu(receive, send, model, keep_alive_seconds(None), answer)

    # -- test controls -------------------------------------------------------

    async def _sim_config(self, body: bytes, receive: Receive, send: Send) -> None:
        if body:
            try:
                update = _config_decoder.decode(body)
            except msgspec.DecodeError as exc:
                await _respond(send, 400, _encode({"error": str(exc)}))
                return
            self._apply(update)
        await _respond(send, 200, _encode(self.config))

    async def _sim_requests(self, body: bytes, receive: Receive, send: Send) -> None:
        await _respond(send, 200, _encode(self.recorded_requests()))

    async def _sim_clear(self, body: bytes, receive: Receive, send: Send) -> None:
        self._recorded.clear()
        await _respond(send, 200, b"{}")

    async def _sim_stats(self, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.waiting = self.gpu.waiting
        self.stats.loads = self.gpu.loads
        self.stats.eviction_waits = self.gpu.eviction_waits
        self._count_busy()
        await _respond(send, 200, _encode(self.stats))

    async def _sim_reset(self, body: bytes, receive: Receive, send: Send) -> None:
        self.reset()
        await _respond(send, 200, _encode(self.config))


#: The routes a scripted reply answers.
_SCRIPTABLE = frozenset({"/api/chat", "/api/generate", "/api/embed"})

_ROUTES: dict[str, dict[str, Handler]] = {
    "/": {"GET": SimulatorApp._root},
    "/api/version": {"GET": SimulatorApp._version},
    "/api/tags": {"GET": SimulatorApp._tags},
    "/api/ps": {"GET": SimulatorApp._ps},
    "/api/show": {"POST": SimulatorApp._show},
    "/api/chat": {"POST": SimulatorApp._chat},
    "/api/generate": {"POST": SimulatorApp._generate},
    "/api/embed": {"POST": SimulatorApp._embed},
    "/api/embeddings": {"POST": SimulatorApp._embeddings},
    "/_sim/config": {"GET": SimulatorApp._sim_config, "POST": SimulatorApp._sim_config},
    "/_sim/requests": {"GET": SimulatorApp._sim_requests, "DELETE": SimulatorApp._sim_clear},
    "/_sim/stats": {"GET": SimulatorApp._sim_stats},
    "/_sim/reset": {"POST": SimulatorApp._sim_reset},
}


def create_simulator_app(config: SimulatorConfig | None = None) -> SimulatorApp:
    """The simulator app; without a config, it reads the ``NZ_SIM_*`` environment."""
    return SimulatorApp(config)
