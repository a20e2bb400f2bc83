"""Through real Caddy and auth: a thinking model's stream and a spaced native stream.

The simulator is scripted to answer as a thinking model (Ollama's
``message.thinking``) and as a Python-based Ollama-compatible server
(``{"done": true}`` with spaces). The official ``openai`` client sees the
thinking as ``reasoning`` deltas while it streams, the ``ollama`` client
reads the spaced stream to its end, and the ledger bills both from the
upstream's counts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import ollama
import openai
import pytest

from tests.e2e.conftest import Ledger
from tests.e2e.processes import E2EStack, sim_clear, sim_configure, sim_requests

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "think first"}]


@pytest.fixture
def scripted(e2e_stack: E2EStack) -> Iterator[E2EStack]:
    sim_clear(e2e_stack)
    yield e2e_stack
    sim_configure(e2e_stack, script=[])  # nothing left over for the next test


def _line(done: bool = False, **message: str) -> str:
    line: dict[str, object] = {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": "", **message},
        "done": done,
    }
    if done:
        line |= {"done_reason": "stop", "prompt_eval_count": 9, "eval_count": 4}
    return json.dumps(line)  # Python's spelling: spaces after ':' and ','


async def test_thinking_streams_through_caddy_and_spaced_native_streams_finish(
    scripted: E2EStack, ledger: Ledger
) -> None:
    thinking = [_line(thinking="Hm, "), _line(thinking="two."), _line(content="2"), _line(True)]
    spaced = [_line(content="ok"), _line(True)]
    sim_configure(scripted, script=[{"lines": thinking, "split": 9}, {"lines": spaced}])
    caller = await ledger.issue()
    with openai.OpenAI(base_url=f"{scripted.url}/v1", api_key=caller.key, max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="llama3.2",
                messages=USER,  # type: ignore[arg-type]
                stream=True,
                reasoning_effort="low",
            )
        )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning", "") for d in deltas) == "Hm, two."
    assert "".join(d.content or "" for d in deltas) == "2"
    native = ollama.Client(host=scripted.url, headers={"Authorization": f"Bearer {caller.key}"})
    try:
        parts = list(native.chat(model="llama3.2", messages=USER, stream=True))
    finally:
        native._client.close()
    assert "".join(p.message.content or "" for p in parts) == "ok"
    assert (parts[-1].done, parts[-1].eval_count) == (True, 4)
    chats = [r for r in sim_requests(scripted) if r.get("path") == "/api/chat"]
    assert [r["body"].get("think") for r in chats] == ["low", None]  # type: ignore[union-attr]
    # this key's rows (tests that sign identities by hand may share a tenant id)
    rows: list[dict[str, object]] = []
    for _ in range(100):
        rows = [r for r in await ledger.audit(caller.tenant) if r["key_prefix"] == caller.prefix]
        if len(rows) >= 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(
        (r["route"], r["status"], r["estimated"], r["prompt_tokens"], r["completion_tokens"])
        for r in rows
    ) == [("chat", 200, False, 9, 4), ("v1.chat.completions", 200, False, 9, 4)]
