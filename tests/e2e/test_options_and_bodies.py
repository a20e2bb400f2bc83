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
