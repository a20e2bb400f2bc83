"""Through real Caddy: the details real clients act on.

Request ids on every answer, Ollama's ``GET /`` probe, and 429s that the
official SDKs handle well: a spent budget is not retried (``x-should-retry``),
the native body names the limit, and OpenAI's ``x-ratelimit-reset-*`` are sent.
"""

from __future__ import annotations

import re

import httpx
import ollama
import openai
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_clear, sim_requests

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
_DURATION = re.compile(r"^(\d+ms|(\d+m)?\d+(\.\d+)?s)$")


async def test_every_answer_carries_a_request_id(e2e_stack: E2EStack, ledger: Ledger) -> None:
    caller = await ledger.issue(rpm=1)
    auth = {"Authorization": f"Bearer {caller.key}"}
    other = {"Authorization": f"Bearer {(await ledger.issue()).key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=20) as client:
        answers = {
            "401": await client.post("/api/chat", json=CHAT),
            "404": await client.get("/api/no-such-route", headers=auth),
            "403": await client.post("/api/pull", json={"model": "x"}, headers=auth),
            "200": await client.post("/api/chat", json=CHAT, headers=auth),
            "429": await client.post("/api/chat", json=CHAT, headers=auth),
            "root": await client.get("/"),
            # over the e2e Caddy's body limit (NZ_MAX_BODY=1MB): Caddy's own answer
            "413": await client.post(
                "/api/chat",
                headers=other,
                json={**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]},
            ),
        }
    assert {name: r.status_code for name, r in answers.items()} == {
        "401": 401,
        "404": 404,
        "403": 403,
        "200": 200,
        "429": 429,
        "root": 200,
        "413": 413,
    }
    ids = [r.headers.get("x-request-id") for r in answers.values()]
    assert all(ids), {name: r.headers.get("x-request-id") for name, r in answers.items()}
    assert len(set(ids)) == len(ids)  # one id per request, never a shared constant
    for r in answers.values():
        assert len(r.headers.get_list("x-request-id")) == 1


async def test_root_answers_as_ollama_does_without_a_key_or_ollama(e2e_stack: E2EStack) -> None:
    sim_clear(e2e_stack)
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        get = await client.get("/")
        head = await client.head("/")
        post = await client.post("/")
    assert (get.status_code, get.text) == (200, "Ollama is running")
    assert get.headers["content-type"].startswith("text/plain")
    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code in (401, 404, 405)  # only the probe is open
    assert not [r for r in sim_requests(e2e_stack) if r.get("path") == "/"]


async def test_native_429_names_its_limit_and_ollama_sdk_reads_it(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(rpm=1)
    auth = {"Authorization": f"Bearer {caller.key}"}
    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as client:
        assert (await client.post("/api/chat", json=CHAT, headers=auth)).status_code == 200
        refused = await client.post("/api/chat", json=CHAT, headers=auth)
    assert refused.status_code == 429
    body = refused.json()
    assert body["code"] == "rate_limit_exceeded"
    assert body["limit"] == "rpm"
    assert isinstance(body["error"], str)
    assert "x-should-retry" not in refused.headers  # a rate limit is worth retrying
    assert _DURATION.match(refused.headers["x-ratelimit-reset-requests"])

    sdk = ollama.AsyncClient(host=e2e_stack.url, headers=auth)
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            await sdk.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    finally:
        await sdk.close()
    assert caught.value.status_code == 429
    assert "requests per minute" in caught.value.error


async def test_openai_sdk_does_not_retry_a_spent_budget(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    """openai-python (like openai-node) retries 429s twice unless told not to; a
    spent budget must fail at once, whatever its Retry-After says."""
    caller = await ledger.issue(total_tokens=60)
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=20)
    client = openai.AsyncOpenAI(
        base_url=e2e_stack.url + "/v1", api_key=caller.key, max_retries=2, http_client=http
    )
    refused: openai.RateLimitError | None = None
    try:
        for _ in range(10):  # spend the budget, then one more
            sent.clear()
            try:
                await client.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.RateLimitError as exc:
                refused = exc
                break
    finally:
        await client.close()
    assert refused is not None, "the budget never ran out"
    assert len(sent) == 1  # no retry: the SDK honoured x-should-retry
    assert refused.response.headers["x-should-retry"] == "false"
    assert int(refused.response.headers["retry-after"]) >= 1
    assert refused.code == "budget_exceeded"

    async with httpx.AsyncClient(base_url=e2e_stack.url, timeout=10) as raw:
        native = await raw.post(
            "/api/chat", json=CHAT, headers={"Authorization": f"Bearer {caller.key}"}
        )
    assert native.status_code == 429
    assert native.headers["x-should-retry"] == "false"
    assert native.json()["code"] == "budget_exceeded"
    assert native.json()["limit"] == "total_tokens"


async def test_successful_answers_carry_openai_reset_headers(
    e2e_stack: E2EStack, ledger: Ledger
) -> None:
    caller = await ledger.issue(rpm=100, tpm=100_000)
    client = openai.AsyncOpenAI(base_url=e2e_stack.url + "/v1", api_key=caller.key)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await client.close()
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert _DURATION.match(raw.headers[name]), (name, raw.headers.get(name))
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
