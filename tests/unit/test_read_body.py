"""A body past the limit is drained before the 413, so the peer sees the answer, not a reset."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest

from neuronetz_gateway.proxy.asgi import BodyTooLarge, read_body


def _receiver(chunks: list[bytes]) -> tuple[Any, list[bytes]]:
    pending = list(chunks)

    async def receive() -> MutableMapping[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    return receive, pending


@pytest.mark.parametrize("declared", [True, False])
async def test_an_oversized_body_is_read_to_its_end_before_the_refusal(declared: bool) -> None:
    chunks = [b"x" * 100] * 50
    receive, pending = _receiver(chunks)
    headers = [(b"content-length", b"5000")] if declared else []
    with pytest.raises(BodyTooLarge):
        await read_body({"headers": headers}, receive, limit=1000)
    assert pending == []


async def test_a_body_within_the_limit_is_returned_whole() -> None:
    receive, _ = _receiver([b"ab", b"cd"])
    assert await read_body({"headers": []}, receive, limit=4) == b"abcd"
