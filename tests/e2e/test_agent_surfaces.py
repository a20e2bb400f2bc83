"""Through real Caddy and auth: the Anthropic Messages and OpenAI Responses surfaces.

Keys as ``x-api-key`` (the SDK's default) and as ``Authorization: Bearer``
(Claude Code's ``ANTHROPIC_AUTH_TOKEN``, with its ``?beta=true``); auth's
and Caddy's refusals in Anthropic's error shape; each request in the ledger.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Say hello"}]
MESSAGE = {"model": "llama3.2", "max_tokens": 64, "messages": USER}


async def test_anthropic_client_works_through_caddy(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue()
    with anthropic.Anthropic(base_url=e2e_stack.url, api_key=caller.key, max_retries=0) as client:
        reply = client.messages.create(**MESSAGE)  # type: ignore[arg-type]
        with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
            streamed = stream.get_final_message()
        counted = client.messages.count_tokens(model="llama3.2", messages=USER)  # type: ignore[arg-type]
        models = [m.id for m in client.models.list()]  # /v1/models serves this SDK too
    assert "llama3.2:latest" in models
    assert reply.content[0].text  # type: ignore[union-attr]
    assert streamed.content[0].text == reply.content[0].text  # type: ignore[union-attr]
    assert counted.input_tokens > 0
    headers = {"Authorization": f"Bearer {caller.key}", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as raw:
        beta = await raw.post("/v1/messages?beta=true", json=MESSAGE, headers=headers)
    assert beta.status_code == 200
    assert beta.json()["usage"] == {
        "input_tokens": reply.usage.input_tokens,
        "output_tokens": reply.usage.output_tokens,
    }
    totals = await ledger.wait_for_requests(caller.tenant, 5)
    assert totals.requests == 5
    # three generations with the same prompt and answer; count_tokens charges nothing
    assert totals.prompt_tokens == 3 * reply.usage.input_tokens
    assert totals.completion_tokens == 3 * reply.usage.output_tokens
    routes = [row["route"] for row in await ledger.audit(caller.tenant)]
    assert sorted(routes) == ["v1.messages"] * 3 + ["v1.messages.count_tokens", "v1.models"]


async def test_refusals_are_in_anthropics_dialect(e2e_stack: E2EStack, ledger: Ledger) -> None:
    wrong = anthropic.Anthropic(base_url=e2e_stack.url, api_key="nz_wrong_key", max_retries=0)
    with wrong, pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(**MESSAGE)  # type: ignore[arg-type]
    assert denied.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or missing API key"},
    }
    caller = await ledger.issue(rpm=1)
    with anthropic.Anthropic(base_url=e2e_stack.url, api_key=caller.key, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(**{**MESSAGE, "model": "not-installed"})  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(**MESSAGE)  # type: ignore[arg-type]
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    other = await ledger.issue()
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as raw:
        big = {**MESSAGE, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
        too_large = await raw.post("/v1/messages", json=big, headers={"x-api-key": other.key})
        unknown = await raw.get("/v1/messages/batches", headers={"x-api-key": other.key})
    assert too_large.status_code == 413
    assert too_large.json()["error"]["type"] == "request_too_large"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"


async def test_openai_responses_work_through_caddy(e2e_stack: E2EStack, ledger: Ledger) -> None:
    wrong = openai.OpenAI(base_url=f"{e2e_stack.url}/v1", api_key="nz_wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.responses.create(model="llama3.2", input="Say hello")
    caller = await ledger.issue()
    with openai.OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=caller.key, max_retries=0) as client:
        reply = client.responses.create(model="llama3.2", input="Say hello")
        with client.responses.stream(model="llama3.2", input="Say hello") as stream:
            streamed = stream.get_final_response()
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="not-installed", input="Say hello")
    assert reply.output_text and streamed.output_text == reply.output_text
    assert reply.usage is not None
    totals = await ledger.wait_for_requests(caller.tenant, 3)
    assert totals.completion_tokens == 2 * reply.usage.output_tokens
    assert totals.prompt_tokens == 2 * reply.usage.input_tokens
