"""Through real Caddy: options that bound GPU work cannot be dodged, bad bodies are 4xx.

Each test looks behind the gateway only to check effects: what reached the
simulator (which reads ``num_predict`` as Ollama does: below 1 is no limit)
and what the ledger charged.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_clear, sim_configure, sim_requests

pytestmark = pytest.mark.e2e

UNBOUNDED_NUM_PREDICT: list[Any] = [0, 0.5, 1e-9, -1, -2, 1e300]


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }


def _model_requests(stack: E2EStack) -> list[dict[str, Any]]:
    """The bodies of the model requests that reached the simulator (not discovery's GETs)."""
    return [r["body"] for r in sim_requests(stack) if isinstance(r["body"], dict)]


def _forwarded_num_predict(stack: E2EStack) -> list[Any]:
    return [body.get("options", {}).get("num_predict") for body in _model_requests(stack)]


# ---------------------------------------------------------------- num_predict / max_tokens


async def test_unbounded_num_predict_is_capped_on_every_native_route(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(max_num_predict=16)
    auth = {"Authorization": f"Bearer {caller.key}"}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for value in UNBOUNDED_NUM_PREDICT:
            chat = await client.post(
                "/api/chat", json=_chat(options={"num_predict": value}), headers=auth
            )
            assert chat.status_code == 200, (value, chat.text)
            assert chat.json()["eval_count"] == 16, value
            generate = await client.post(
                "/api/generate",
                json={"model": "llama3.2", "prompt": "hi", "stream": False,
                      "options": {"num_predict": value}},
                headers=auth,
            )  # fmt: skip
            assert generate.status_code == 200, (value, generate.text)
            assert generate.json()["eval_count"] == 16, value
    assert _forwarded_num_predict(e2e_stack) == [16] * (2 * len(UNBOUNDED_NUM_PREDICT))


async def test_unbounded_num_predict_is_reserved_as_unbounded_within_the_budget(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    # Ollama would generate without end; the simulator stands for that with 80 chunks.
    caller = await ledger.issue(total_tokens=50)
    auth = {"Authorization": f"Bearer {caller.key}"}
    sim_configure(e2e_stack, chunks=80)
    sim_clear(e2e_stack)
    try:
        async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
            answer = await client.post(
                "/api/chat", json=_chat(options={"num_predict": 0}), headers=auth
            )
    finally:
        sim_configure(e2e_stack, chunks=20)
    assert answer.status_code == 200, answer.text
    (forwarded,) = _forwarded_num_predict(e2e_stack)
    assert isinstance(forwarded, int)
    assert 1 <= forwarded < 50
    totals = await ledger.wait_for_requests(caller.tenant, 1)
    assert totals.total_tokens <= 50


async def test_openai_max_tokens_zero_is_a_400_and_a_large_one_is_clamped(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(max_num_predict=16)
    auth = {"Authorization": f"Bearer {caller.key}"}
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    completion = {"model": "llama3.2", "prompt": "hi"}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for path, body, field in (
            ("/v1/chat/completions", chat, "max_tokens"),
            ("/v1/chat/completions", chat, "max_completion_tokens"),
            ("/v1/completions", completion, "max_tokens"),
        ):
            for value in (0, 0.5, -1, 1e-9):
                refused = await client.post(path, json={**body, field: value}, headers=auth)
                assert refused.status_code == 400, (path, field, value, refused.text)
                error = refused.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert error["param"] == field
            assert _model_requests(e2e_stack) == []
            clamped = await client.post(path, json={**body, field: 10**9}, headers=auth)
            assert clamped.status_code == 200, clamped.text
            assert clamped.json()["usage"]["completion_tokens"] == 16
            assert _forwarded_num_predict(e2e_stack) == [16]
            sim_clear(e2e_stack)


async def test_responses_max_output_tokens_below_one_is_a_400_and_a_large_one_is_clamped(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(max_num_predict=16)
    auth = {"Authorization": f"Bearer {caller.key}"}
    body = {"model": "llama3.2", "input": "hi"}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for value in (0, 0.5, -1, 1e-9):
            refused = await client.post(
                "/v1/responses", json={**body, "max_output_tokens": value}, headers=auth
            )
            assert refused.status_code == 400, (value, refused.text)
            assert refused.json()["error"]["type"] == "invalid_request_error"
        assert _model_requests(e2e_stack) == []
        clamped = await client.post(
            "/v1/responses", json={**body, "max_output_tokens": 10**9}, headers=auth
        )
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["usage"]["output_tokens"] == 16
    assert _forwarded_num_predict(e2e_stack) == [16]


async def test_anthropic_max_tokens_below_one_is_a_400_and_a_large_one_is_clamped(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(max_num_predict=16)
    auth = {"x-api-key": caller.key, "anthropic-version": "2023-06-01"}
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for value in (0, 0.5, -1, 1e-9):
            refused = await client.post(
                "/v1/messages", json={**body, "max_tokens": value}, headers=auth
            )
            assert refused.status_code == 400, (value, refused.text)
            assert refused.json()["type"] == "error"
            assert refused.json()["error"]["type"] == "invalid_request_error"
        assert _model_requests(e2e_stack) == []
        clamped = await client.post(
            "/v1/messages", json={**body, "max_tokens": 10**9}, headers=auth
        )
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["usage"]["output_tokens"] == 16
    assert _forwarded_num_predict(e2e_stack) == [16]


# ---------------------------------------------------------------- keep_alive

SHARED_MODEL_ABUSE: list[Any] = ["1ns", 0.5, "999999h", 1e300, 0, "0", -1, "-1m", "59s", "25h",
                                 "soon", True, "1 m"]  # fmt: skip


async def test_keep_alive_outside_the_window_is_a_400_naming_it(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}"}
    bodies = {
        "/api/chat": _chat(),
        "/api/generate": {"model": "llama3.2", "prompt": "hi", "stream": False},
        "/api/embed": {"model": "llama3.2", "input": "hi"},
        "/api/embeddings": {"model": "llama3.2", "prompt": "hi"},
    }
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for path, body in bodies.items():
            for value in SHARED_MODEL_ABUSE:
                answer = await client.post(path, json={**body, "keep_alive": value}, headers=auth)
                assert answer.status_code == 400, (path, value, answer.text)
                assert "keep_alive" in answer.json()["error"], (path, value)
        assert _model_requests(e2e_stack) == []
        for path, body in bodies.items():
            for value in ("5m", 300, "24h", None):
                answer = await client.post(path, json={**body, "keep_alive": value}, headers=auth)
                assert answer.status_code == 200, (path, value, answer.text)
    assert len(_model_requests(e2e_stack)) == 4 * len(bodies)


async def test_a_key_that_may_override_keep_alive_sends_it_as_is(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(allow_keep_alive_override=True)
    auth = {"Authorization": f"Bearer {caller.key}"}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        answer = await client.post("/api/chat", json=_chat(keep_alive="1ns"), headers=auth)
    assert answer.status_code == 200, answer.text
    (seen,) = _model_requests(e2e_stack)
    assert json.dumps(seen["keep_alive"]) == '"1ns"'


# ---------------------------------------------------------------- what Ollama decodes

KELVIN = "\u212a"
BIG_PROMPT = "word " * 2400  # 12 kB: far past a 300-token budget


async def test_fields_ollama_would_read_in_another_case_are_refused(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(total_tokens=300, max_num_predict=16)
    auth = {"Authorization": f"Bearer {caller.key}"}
    spellings: dict[str, dict[str, Any]] = {
        "messages[0].Content": _chat(messages=[{"role": "user", "Content": BIG_PROMPT}]),
        "messages[0].CONTENT": _chat(messages=[{"role": "user", "CONTENT": BIG_PROMPT}]),
        "messages[0].Images": _chat(
            messages=[{"role": "user", "content": "hi", "Images": ["aGk="] * 4}]
        ),
        "Options": _chat(Options={"num_predict": 0}),
        "options.Num_Predict": _chat(options={"Num_Predict": 0}),
        "Prompt": {"model": "llama3.2", "Prompt": BIG_PROMPT, "stream": False},
        f"{KELVIN}eep_alive": _chat(**{f"{KELVIN}eep_alive": 0}),
        "Model": {"Model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
    }
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for field, body in spellings.items():
            path = "/api/generate" if "prompt" in {k.lower() for k in body} else "/api/chat"
            answer = await client.post(path, json=body, headers=auth)
            assert answer.status_code == 400, (field, answer.text)
            assert field in answer.json()["error"], (field, answer.text)
    assert _model_requests(e2e_stack) == []


async def test_the_openai_surface_forwards_only_what_it_decoded(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}"}
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi", "Content": BIG_PROMPT}],
        "Max_Tokens": 0,
    }
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        answer = await client.post("/v1/chat/completions", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    (seen,) = _model_requests(e2e_stack)
    assert seen["messages"] == [{"role": "user", "content": "hi"}]
    assert "Max_Tokens" not in seen
    assert BIG_PROMPT not in json.dumps(seen)


# ---------------------------------------------------------------- bad input is a 4xx

NOT_UTF8 = (
    b'{"model":"llama3.2","prompt":"caf\xe9","input":"caf\xe9",'
    b'"messages":[{"role":"user","content":"caf\xe9"}]}'
)
POST_ROUTES = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]


def _proxy_logs(stack: E2EStack) -> str:
    return "\n".join(p.log_tail(400) for p in stack.processes if p.name.startswith("proxy"))


async def test_a_body_that_is_not_utf8_is_a_400_in_the_dialect_on_every_route(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue()
    auth = {"Authorization": f"Bearer {caller.key}", "Content-Type": "application/json"}
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        for path in POST_ROUTES:
            for body in (NOT_UTF8, NOT_UTF8.replace(b"\xe9", b"\xc3"), b"\xff\xfe{}"):
                answer = await client.post(path, content=body, headers=auth)
                assert answer.status_code == 400, (path, body, answer.text)
                error = answer.json()["error"]
                if path.startswith("/v1/messages"):
                    assert answer.json()["type"] == "error", (path, answer.text)
                    assert error["type"] == "invalid_request_error", (path, error)
                elif path.startswith("/v1/"):
                    assert error["type"] == "invalid_request_error", (path, error)
                else:
                    assert isinstance(error, str), (path, error)
    assert _model_requests(e2e_stack) == []
    logs = _proxy_logs(e2e_stack)
    assert "Traceback" not in logs
    assert "proxy_failed" not in logs
