"""The audit writer against real Postgres: batches, spool replay (idempotent), shutdown flush."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.accounting import AuditRow


def _row(request_id: str) -> AuditRow:
    return AuditRow(
        request_id=request_id,
        ts=datetime.now(UTC),
        tenant_id=7,
        key_id=8,
        key_prefix="nz_abc12345",
        route="chat",
        model="llama3.2:latest",
        status=200,
        prompt_tokens=3,
        completion_tokens=4,
        ttfb_ms=1,
        duration_ms=2,
        streamed=True,
        client_disconnected=False,
        estimated=False,
    )


def _put(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _count(store: Store, request_ids: list[str]) -> int:
    return int(
        await store.pool.fetchval(
            "SELECT count(*) FROM usage_log WHERE request_id = ANY($1::text[])", request_ids
        )
    )


async def test_shutdown_flushes_the_queue(store: Store, tmp_path: Path) -> None:
    writer = AuditWriter(store.pool, tmp_path, flush_interval=60)
    await writer.start()
    ids = [f"req-flush-{secrets.token_hex(4)}" for _ in range(5)]
    for request_id in ids:
        writer.submit(_row(request_id))
    await writer.stop()  # long before the 60 s flush interval
    assert await _count(store, ids) == 5


async def test_replaying_a_spool_file_twice_writes_each_row_once(
    store: Store, tmp_path: Path
) -> None:
    ids = [f"req-spool-{secrets.token_hex(4)}" for _ in range(3)]
    data = b"".join(msgspec.json.encode(_row(i)) + b"\n" for i in ids)
    _put(tmp_path / "00000000000000000001-aaaa-audit.jsonl", data)
    _put(tmp_path / "00000000000000000002-bbbb-audit.jsonl", data)  # a replay again
    writer = AuditWriter(store.pool, tmp_path)
    assert await writer.replay_spool() == 2
    assert await _count(store, ids) == 3
    assert _names(tmp_path) == []


async def test_rows_postgres_rejects_are_set_aside_not_retried_forever(
    store: Store, tmp_path: Path
) -> None:
    bad = msgspec.json.encode(_row("x" * 100))  # longer than request_id's varchar(64)
    _put(tmp_path / "00000000000000000001-cccc-audit.jsonl", bad + b"\n")
    writer = AuditWriter(store.pool, tmp_path)
    assert await writer.replay_spool() == 0
    assert [Path(n).suffix for n in _names(tmp_path)] == [".bad"]
    assert writer.spooled_files == 0
