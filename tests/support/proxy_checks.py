"""Helpers for proxy integration tests: audit rows, unique ids, leases."""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from neuronetz_gateway.adapters.postgres.store import Store

__all__ = ["eventually", "new_ids", "wait_audit_rows"]


def new_ids() -> dict[str, int]:
    """A tenant and key id no other test uses (identities need no database rows)."""
    return {"tenant_id": 1000 + secrets.randbelow(10**9), "key_id": 1000 + secrets.randbelow(10**9)}


async def wait_audit_rows(
    store: Store, request_ids: list[str], within: float = 10.0
) -> dict[str, dict[str, Any]]:
    """The audit rows of ``request_ids`` once all are written (fails after ``within`` s)."""
    deadline = time.monotonic() + within
    rows = []
    while time.monotonic() < deadline:
        rows = await store.pool.fetch(
            "SELECT * FROM usage_log WHERE request_id = ANY($1::text[])", request_ids
        )
        if len(rows) >= len(request_ids):
            break
        await asyncio.sleep(0.05)
    found = {r["request_id"]: dict(r) for r in rows}
    missing = set(request_ids) - set(found)
    assert not missing, f"audit rows missing after {within}s: {sorted(missing)}"
    return found


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> bool:
    """Poll ``check`` until it is true or ``within`` seconds pass; its last answer."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        ok = await result if inspect.isawaitable(result) else result
        if ok or time.monotonic() > deadline:
            return bool(ok)
        await asyncio.sleep(0.05)
