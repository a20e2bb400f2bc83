"""A streamed request that waits for a backend's slot, on fakes (SPEC section 12, issue 12).

The upstream (``fakes.QueueingUpstream``) reports every call queued and holds
it until the test grants the slot or refuses it (a queue timeout). Checked:
keep-alive frames in the surface's words while it waits (none on native),
the real stream afterwards in the same response, a queue timeout before the
start (503 + Retry-After) and after it (the surface's in-stream error), and a
client that leaves while queued (its wait cancelled, nothing charged).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.routes import proxied_fast_paths
from neuronetz_gateway.settings import Secret, Settings
from tests.unit.fakes import Client, FakeStream, Proxy, QueueingUpstream

ROUTES = proxied_fast_paths()
BUDGET = Limits(daily_tokens=100_000)  # makes the pipeline reserve and settle
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
MESSAGES = {**CHAT, "max_tokens": 64}
REPLY = [
    b'{"message":{"role":"assistant","content":"Hel"},"done":false}\n',
    b'{"message":{"role":"assistant","content":"lo"},"done":false}\n',
    b'{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    b'"prompt_eval_count":9,"eval_count":2}\n',
]
BUSY = Refusal(
    503,
    "service_unavailable",
    "every backend for this model is busy; try again shortly",
    retry_after=15,
)


def _queueing(ping_seconds: float = 0.01) -> tuple[Proxy, QueueingUpstream]:
    upstream = QueueingUpstream()
    settings = Settings(gateway_secret=Secret("u" * 48), queue_ping_seconds=ping_seconds)
    return Proxy(upstream=upstream, settings=settings), upstream


def _start(
    proxy: Proxy, path: str, route: str, body: dict[str, Any], client: Client
) -> asyncio.Task[None]:
    token = proxy.identity(route, key_limits=BUDGET)
    scope = proxy.scope("POST", path, token)
    return asyncio.ensure_future(ROUTES[path](scope, client.receive, client.send))


async def _until(condition: Callable[[], bool]) -> None:
    """Poll what the fakes observed, bounded (the frames come by the event loop's timers)."""
    deadline = asyncio.get_running_loop().time() + 5
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_an_openai_stream_gets_sse_comments_while_queued_then_its_answer() -> None:
    proxy, upstream = _queueing()
    upstream.streams.append(FakeStream(REPLY))
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/v1/chat/completions", "v1.chat.completions", CHAT, client)
    await _until(lambda: client.body.count(b": ping\n\n") >= 2)
    assert client.status == 200
    assert client.headers[b"content-type"] == b"text/event-stream"
    upstream.grant.set()
    await asyncio.wait_for(task, 5)

    pings, _, rest = client.body.rpartition(b": ping\n\n")
    assert set(pings.split(b"\n\n")) <= {b": ping", b""}  # only comments before the answer
    events = [e for e in rest.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    assert client.ended
    (reserved,) = proxy.limiter.reserved
    assert proxy.limiter.settled == [(reserved, 11)]
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.streamed, row.prompt_tokens, row.completion_tokens) == (
        200,
        True,
        9,
        2,
    )


async def test_an_anthropic_stream_gets_ping_events_while_queued_then_message_start() -> None:
    proxy, upstream = _queueing()
    upstream.streams.append(FakeStream(REPLY))
    client = Client(json.dumps(MESSAGES).encode())
    task = _start(proxy, "/v1/messages", "v1.messages", MESSAGES, client)
    await _until(lambda: client.body.count(b"event: ping\n") >= 2)
    assert b"message_start" not in client.body  # nothing but pings until the slot
    upstream.grant.set()
    await asyncio.wait_for(task, 5)

    names = [e.split(b"\n")[0] for e in client.body.split(b"\n\n") if e]
    first = names.index(b"event: message_start")
    assert first >= 2
    assert set(names[:first]) == {b"event: ping"}
    assert names[-1] == b"event: message_stop"
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.completion_tokens) == (200, 2)


async def test_a_native_stream_gets_no_byte_while_queued() -> None:
    proxy, upstream = _queueing()
    upstream.streams.append(FakeStream(REPLY))
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/api/chat", "chat", CHAT, client)
    await _until(lambda: upstream.waiting == 1)
    await asyncio.sleep(0.1)  # ten ping intervals: an SSE surface would have had pings
    assert client.status is None
    assert client.parts == []
    upstream.grant.set()
    await asyncio.wait_for(task, 5)
    assert client.body == b"".join(REPLY)  # byte for byte, nothing added


async def test_a_queue_timeout_before_the_start_is_a_503_with_retry_after() -> None:
    proxy, upstream = _queueing(ping_seconds=60)
    upstream.refusal = BUSY
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/v1/chat/completions", "v1.chat.completions", CHAT, client)
    await _until(lambda: upstream.waiting == 1)
    upstream.grant.set()
    await asyncio.wait_for(task, 5)
    assert client.status == 503
    assert client.headers[b"retry-after"] == b"15"
    assert client.json()["error"]["code"] == "service_unavailable"


async def test_a_queue_timeout_after_the_start_is_an_openai_error_chunk() -> None:
    proxy, upstream = _queueing()
    upstream.refusal = BUSY
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/v1/chat/completions", "v1.chat.completions", CHAT, client)
    await _until(lambda: b": ping" in client.body)
    upstream.grant.set()
    await asyncio.wait_for(task, 5)
    assert client.status == 200
    last = client.body.rstrip().rsplit(b"\n\n", 1)[-1]
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "service_unavailable"
    assert "busy" in error["message"]
    assert client.ended
    (reserved,) = proxy.limiter.reserved
    assert proxy.limiter.settled == [(reserved, 0)]  # the reservation is given back whole
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.streamed, row.completion_tokens) == (503, True, 0)


async def test_a_queue_timeout_after_the_start_is_an_anthropic_overloaded_error() -> None:
    proxy, upstream = _queueing()
    upstream.refusal = BUSY
    client = Client(json.dumps(MESSAGES).encode())
    task = _start(proxy, "/v1/messages", "v1.messages", MESSAGES, client)
    await _until(lambda: b"event: ping" in client.body)
    upstream.grant.set()
    await asyncio.wait_for(task, 5)
    event = client.body.rstrip().rsplit(b"\n\n", 1)[-1]
    name, data = event.split(b"\n")
    assert name == b"event: error"
    assert json.loads(data.removeprefix(b"data: "))["error"]["type"] == "overloaded_error"
    (row,) = proxy.audit.audit_rows()
    assert row.status == 503


async def test_a_queue_timeout_after_the_start_is_a_failed_response() -> None:
    proxy, upstream = _queueing()
    upstream.refusal = BUSY
    body = {"model": "llama3.2", "input": "hi", "stream": True}
    client = Client(json.dumps(body).encode())
    task = _start(proxy, "/v1/responses", "v1.responses", body, client)
    await _until(lambda: b": keep-alive" in client.body)
    upstream.grant.set()
    await asyncio.wait_for(task, 5)
    names = [e.split(b"\n")[0] for e in client.body.split(b"\n\n") if e.startswith(b"event:")]
    assert names == [
        b"event: response.created",
        b"event: response.in_progress",
        b"event: response.failed",
    ]


async def test_a_client_that_leaves_while_queued_frees_its_place_and_pays_nothing() -> None:
    for path, route, body in (
        ("/v1/chat/completions", "v1.chat.completions", CHAT),
        ("/api/chat", "chat", CHAT),  # native: no byte sent, still watched
        ("/v1/chat/completions", "v1.chat.completions", {**CHAT, "stream": False}),
        ("/api/chat", "chat", {**CHAT, "stream": False}),  # whole answers are watched too
    ):
        proxy, upstream = _queueing()
        leave = asyncio.Event()
        client = Client(json.dumps(body).encode(), leave=leave)
        task = _start(proxy, path, route, body, client)
        await _until(lambda u=upstream: u.waiting == 1)  # type: ignore[misc]
        leave.set()
        await asyncio.wait_for(task, 5)
        assert upstream.cancelled == 1, path  # the wait (its place in the queue) is given up
        (reserved,) = proxy.limiter.reserved
        assert proxy.limiter.settled == [(reserved, 0)]
        (row,) = proxy.audit.audit_rows()
        assert (row.client_disconnected, row.completion_tokens) == (True, 0), path


async def test_a_call_never_queued_starts_nothing_while_it_waits_for_headers() -> None:
    proxy = Proxy(settings=Settings(gateway_secret=Secret("u" * 48), queue_ping_seconds=0.01))
    hold = asyncio.Event()

    async def slow_open(*args: Any) -> FakeStream:
        await hold.wait()  # a slow backend, not a queue: no keep-alive, no early start
        return FakeStream(REPLY)

    proxy.upstream.open = slow_open  # type: ignore[method-assign]
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/v1/chat/completions", "v1.chat.completions", CHAT, client)
    await asyncio.sleep(0.1)
    assert client.status is None
    hold.set()
    await asyncio.wait_for(task, 5)
    assert b": ping" not in client.body
    assert client.status == 200


def _gauge(proxy: Proxy, name: str, **labels: str) -> float | None:
    registry = proxy.ctx.metrics.registry
    return registry.get_sample_value(name, labels)


async def test_the_backend_metrics_carry_the_name_the_upstream_gives_the_call() -> None:
    proxy = Proxy()
    proxy.upstream.backend = "gpu1"  # a pool names the backend it sends to (on_sent)
    hold = asyncio.Event()
    proxy.upstream.streams.append(FakeStream(REPLY, hold=hold))
    client = Client(json.dumps(CHAT).encode())
    task = _start(proxy, "/v1/chat/completions", "v1.chat.completions", CHAT, client)
    await _until(lambda: b"Hel" in client.body)
    assert _gauge(proxy, "nz_proxy_backend_in_flight", backend="gpu1") == 1
    assert not _gauge(proxy, "nz_proxy_backend_in_flight", backend="default")
    hold.set()
    await asyncio.wait_for(task, 5)
    assert _gauge(proxy, "nz_proxy_backend_in_flight", backend="gpu1") == 0
    assert _gauge(proxy, "nz_proxy_backend_ttft_seconds_count", backend="gpu1") == 1
    assert _gauge(proxy, "nz_proxy_backend_tokens_total", backend="gpu1", kind="completion") == 2
