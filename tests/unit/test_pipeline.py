"""The proxy's pipeline on fakes of its ports: every step, no Redis, Postgres or subprocess.

Each test calls a route the way Granian does (``routes.proxied_fast_paths``)
with a signed identity, a scripted upstream and an in-memory limiter and
audit sink, and checks what the client got, what went upstream, what was
reserved and settled, and the audit row.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from neuronetz_gateway.domain.identity import Limits, OptionCaps
from neuronetz_gateway.domain.limits import Decision
from neuronetz_gateway.proxy.routes import proxied_fast_paths
from tests.unit.fakes import Client, FakeStream, Proxy

ROUTES = proxied_fast_paths()
BUDGET = Limits(daily_tokens=100_000)  # makes the pipeline reserve and settle


def _lines(*chunks: dict[str, Any]) -> list[bytes]:
    return [json.dumps(c).encode() + b"\n" for c in chunks]


async def _call(
    proxy: Proxy,
    path: str,
    body: Any,
    route: str,
    *,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    leave: bool = False,
    **identity: Any,
) -> Client:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = Client(raw, leave_after_start=leave)
    scope = proxy.scope("POST", path, proxy.identity(route, **identity), headers)
    await asyncio.wait_for(ROUTES[path](scope, client.receive, client.send), 5)
    return client


async def test_native_stream_passes_through_byte_for_byte_and_is_billed_exactly() -> None:
    proxy = Proxy()
    # the final line spelled with spaces, as Python-built servers write it, and cut in two
    reads = [
        b'{"message":{"content":"Hel"},"done":false}\n',
        b'{"message":{"content":"lo"},"done":false}\n{"done": true, "prompt_eval',
        b'_count": 12, "eval_count": 2}\n',
    ]
    proxy.upstream.streams.append(FakeStream(reads))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    headers = ((b"x-claude-code-session-id", b"sess-1"),)
    client = await _call(proxy, "/api/chat", body, "chat", headers=headers, key_limits=BUDGET)

    assert client.status == 200
    assert client.body == b"".join(reads)  # nothing added, nothing changed
    ((call, path, sent),) = proxy.upstream.calls
    assert path == "/api/chat"
    assert (call.model, call.tenant_id, call.session, call.stream) == (
        "llama3.2:latest",
        7,
        "sess-1",
        True,
    )
    assert json.loads(sent or b"") == body  # re-encoded, unchanged (room enough: no cap)
    (reserved,) = proxy.limiter.reserved
    assert reserved > 2048  # the prompt estimate plus NZ_DEFAULT_MAX_TOKENS
    assert proxy.limiter.settled == [(reserved, 14)]
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 12, 2)
    assert (row.streamed, row.estimated, row.model, row.route) == (
        True,
        False,
        "llama3.2:latest",
        "chat",
    )


async def test_native_stream_cut_off_ends_with_the_error_line_and_is_estimated() -> None:
    proxy = Proxy()
    reads = _lines({"response": "a", "done": False}, {"response": "b", "done": False})
    proxy.upstream.streams.append(FakeStream(reads))
    client = await _call(proxy, "/api/generate", {"model": "llama3.2", "prompt": "x"}, "generate")

    assert client.body.startswith(b"".join(reads))
    assert json.loads(client.body.splitlines()[-1]) == {
        "error": "the model server closed the stream before it finished"
    }
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.estimated, row.completion_tokens) == (502, True, 2)


async def test_a_key_cap_is_applied_before_the_body_goes_upstream() -> None:
    proxy = Proxy()
    proxy.upstream.streams.append(
        FakeStream(
            [b'{"done":true,"prompt_eval_count":3,"eval_count":5}'], content_type="application/json"
        )
    )
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 900}}
    client = await _call(
        proxy, "/api/generate", body, "generate", caps=OptionCaps(max_num_predict=50)
    )

    assert client.status == 200
    assert proxy.upstream.bodies()[0]["options"]["num_predict"] == 50
    (row,) = proxy.audit.audit_rows()
    assert (row.prompt_tokens, row.completion_tokens, row.streamed) == (3, 5, False)


@pytest.mark.parametrize(
    ("path", "route", "status", "shape"),
    [
        ("/api/chat", "chat", 403, "native"),
        ("/v1/chat/completions", "v1.chat.completions", 404, "openai"),
        ("/v1/messages", "v1.messages", 404, "anthropic"),
    ],
)
async def test_a_model_outside_the_keys_set_never_goes_upstream(
    path: str, route: str, status: int, shape: str
) -> None:
    proxy = Proxy()
    body = {
        "model": "llama3.2",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    client = await _call(proxy, path, body, route, models=["qwen2.5:0.5b"])

    assert client.status == status
    error = client.json()
    if shape == "native":
        assert error == {"error": "model 'llama3.2' is not available to this key"}
    elif shape == "openai":
        assert error["error"]["code"] == "model_not_found"
    else:
        assert error["error"]["type"] == "not_found_error"
    assert proxy.upstream.calls == []
    (row,) = proxy.audit.audit_rows()
    assert row.status == status


async def test_a_budget_refusal_is_a_429_and_nothing_goes_upstream() -> None:
    proxy = Proxy()
    proxy.limiter.refuse = Decision(
        allowed=False, reason="daily_tokens", level="key", retry_after=60
    )
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    client = await _call(
        proxy, "/v1/chat/completions", body, "v1.chat.completions", key_limits=BUDGET
    )

    assert client.status == 429
    assert client.headers[b"x-should-retry"] == b"false"
    assert client.json()["error"]["code"] == "budget_exceeded"
    assert proxy.upstream.calls == []


async def test_openai_stream_is_translated_to_sse_and_billed_from_the_final_line() -> None:
    proxy = Proxy()
    reads = _lines(
        {"message": {"role": "assistant", "content": "Hi"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True,
         "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 1},
    )  # fmt: skip
    proxy.upstream.streams.append(FakeStream(reads))
    body = {
        "model": "llama3.2",
        "stream": True,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": "hi"}],
    }
    client = await _call(
        proxy, "/v1/chat/completions", body, "v1.chat.completions", key_limits=BUDGET
    )

    assert client.headers[b"content-type"] == b"text/event-stream"
    frames = [f for f in client.body.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    deltas = [json.loads(f[6:])["choices"][0]["delta"] for f in frames[:-1]]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    assert proxy.upstream.calls[0][1] == "/api/chat"
    assert proxy.upstream.bodies()[0]["options"]["num_predict"] == 40
    assert proxy.limiter.settled[0][1] == 10
    (row,) = proxy.audit.audit_rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.estimated) == (
        200,
        9,
        1,
        False,
    )


@pytest.mark.parametrize(
    ("fields", "headers", "session"),
    [
        ({"prompt_cache_key": "pck-1", "user": "u-1"}, (), "pck-1"),
        ({"user": "u-1"}, (), "u-1"),
        ({"user": "  "}, (), None),
        ({"user": "u-1"}, ((b"session-id", b"codex-1"),), "codex-1"),
    ],
)
async def test_an_openai_body_names_the_session_the_upstream_routes_by(
    fields: dict[str, str], headers: tuple[tuple[bytes, bytes], ...], session: str | None
) -> None:
    """``prompt_cache_key``, else ``user``, is the session hint; a session header wins.
    Neither field goes upstream (Ollama has no use for them)."""
    proxy = Proxy()
    reads = _lines(
        {"message": {"role": "assistant", "content": "Hi"}, "done": True,
         "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 1},
    )  # fmt: skip
    proxy.upstream.streams.append(FakeStream(reads))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **fields}
    await _call(proxy, "/v1/chat/completions", body, "v1.chat.completions", headers=headers)

    ((call, _, sent),) = proxy.upstream.calls
    assert call.session == session
    assert sent is not None
    assert b"pck-1" not in sent
    assert b"u-1" not in sent


async def test_a_client_that_leaves_mid_stream_stops_the_upstream_and_still_pays() -> None:
    proxy = Proxy()
    stream = FakeStream(_lines({"response": "a", "done": False}), hold=asyncio.Event())
    proxy.upstream.streams.append(stream)
    await _call(
        proxy, "/api/generate", {"model": "llama3.2", "prompt": "hello there"}, "generate",
        leave=True, key_limits=BUDGET,
    )  # fmt: skip

    assert stream.aborted
    (row,) = proxy.audit.audit_rows()
    assert (row.client_disconnected, row.estimated, row.completion_tokens) == (True, True, 1)
    assert row.prompt_tokens > 0  # the prompt estimate
    assert proxy.limiter.settled[0][1] == row.prompt_tokens + 1


async def test_anthropic_whole_answer_is_translated_and_counted() -> None:
    proxy = Proxy()
    answer = {
        "message": {"role": "assistant", "content": "Hello"},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 4,
        "eval_count": 2,
    }
    proxy.upstream.streams.append(
        FakeStream([json.dumps(answer).encode()], content_type="application/json")
    )
    body = {"model": "llama3.2", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    client = await _call(proxy, "/v1/messages", body, "v1.messages")

    assert client.status == 200
    message = client.json()
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["usage"]["input_tokens"] == 4
    assert proxy.upstream.bodies()[0]["options"]["num_predict"] == 64
    (row,) = proxy.audit.audit_rows()
    assert (row.prompt_tokens, row.completion_tokens, row.route) == (4, 2, "v1.messages")


async def test_an_unreachable_upstream_is_a_502_in_the_dialect() -> None:
    proxy = Proxy()
    proxy.upstream.unavailable = True
    body = {"model": "llama3.2", "input": "hello"}
    client = await _call(proxy, "/v1/embeddings", body, "v1.embeddings")

    assert client.status == 502
    assert client.json()["error"]["code"] == "upstream_unavailable"
    (row,) = proxy.audit.audit_rows()
    assert row.status == 502


async def test_an_identity_for_another_route_is_refused_before_anything_runs() -> None:
    proxy = Proxy()
    client = Client(b"{}")
    scope = proxy.scope("POST", "/api/chat", proxy.identity("generate"))
    await ROUTES["/api/chat"](scope, client.receive, client.send)

    assert client.status == 401
    assert proxy.upstream.calls == []
    assert proxy.audit.rows == []


async def test_a_replayed_identity_gets_401_and_no_accounting() -> None:
    proxy = Proxy()
    proxy.limiter.claimed.add("r" * 32)  # used before, on another replica
    body = {"model": "llama3.2", "prompt": "x"}
    client = await _call(proxy, "/api/generate", body, "generate", key_limits=BUDGET)

    assert client.status == 401
    assert proxy.upstream.calls == []
    assert proxy.audit.rows == []


async def test_a_streams_audit_row_is_queued_before_its_settle_is_sent() -> None:
    # a proxy killed during the settle's round trip must still have the row (journaled)
    proxy = Proxy()
    reads = _lines({"message": {"content": "a"}, "done": False}, {"done": True, "eval_count": 1})
    proxy.upstream.streams.append(FakeStream(reads))
    rows_at_settle: list[int] = []
    settle = proxy.limiter.settle

    async def watched_settle(**kwargs: Any) -> Any:
        rows_at_settle.append(len(proxy.audit.audit_rows()))
        return await settle(**kwargs)

    proxy.limiter.settle = watched_settle  # type: ignore[method-assign]
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    client = await _call(proxy, "/api/chat", body, "chat", key_limits=BUDGET)

    assert client.status == 200
    assert rows_at_settle == [1]
    assert len(proxy.limiter.settled) == 1
