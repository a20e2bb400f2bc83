"""The audit writer against real Postgres: batches, spool replay (idempotent), shutdown flush."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.accounting import AuditRow, PromptRow


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


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _read(path: Path) -> bytes:
    return path.read_bytes()


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
    bad = msgspec.json.encode(msgspec.structs.replace(_row("req-bad"), status=2**40))
    _put(tmp_path / "00000000000000000001-cccc-audit.jsonl", bad + b"\n")
    writer = AuditWriter(store.pool, tmp_path)
    assert await writer.replay_spool() == 1
    assert [Path(n).suffix for n in _names(tmp_path)] == [".bad"]
    assert writer.spooled_files == 0
    assert await writer.replay_spool() == 0  # set aside: not tried again


async def test_one_refused_row_costs_the_others_nothing(store: Store, tmp_path: Path) -> None:
    """A row Postgres refuses for good is isolated; its batch mates land (and no row is lost)."""
    writer = AuditWriter(store.pool, tmp_path, flush_interval=60)
    await writer.start()
    ids = [f"req-batch-{secrets.token_hex(4)}" for _ in range(9)]
    refused = msgspec.structs.replace(_row("req-refused-" + secrets.token_hex(4)), status=2**40)
    for i, request_id in enumerate(ids):
        writer.submit(_row(request_id))
        if i == 4:
            writer.submit(refused)
    await writer.stop()
    assert await _count(store, ids) == 9
    set_aside = [n for n in _names(tmp_path) if n.endswith(".bad")]
    assert len(set_aside) == 1
    assert refused.request_id.encode() in _read(tmp_path / set_aside[0])


async def test_text_postgres_cannot_store_is_cleaned_not_lost(store: Store, tmp_path: Path) -> None:
    """NUL, lone surrogates and over-long model names (client input) must not refuse a batch."""
    writer = AuditWriter(store.pool, tmp_path, flush_interval=60)
    await writer.start()
    poisoned = [
        msgspec.structs.replace(_row(f"req-nul-{secrets.token_hex(4)}"), model="llama\x00x"),
        msgspec.structs.replace(_row(f"req-sur-{secrets.token_hex(4)}"), model="m\ud800"),
        msgspec.structs.replace(_row(f"req-long-{secrets.token_hex(4)}"), model="m" * 5000),
    ]
    good = [f"req-good-{secrets.token_hex(4)}" for _ in range(5)]
    for row in poisoned:
        writer.submit(row)
    for request_id in good:
        writer.submit(_row(request_id))
    await writer.stop()
    assert await _count(store, good + [r.request_id for r in poisoned]) == 8
    assert _names(tmp_path) == []
    models = await store.pool.fetch(
        "SELECT model FROM usage_log WHERE request_id = ANY($1::text[]) ORDER BY request_id",
        [r.request_id for r in poisoned],
    )
    assert all("\x00" not in m["model"] and len(m["model"]) <= 200 for m in models)


async def test_writers_sharing_a_spool_replay_each_file_once(store: Store, tmp_path: Path) -> None:
    """Two processes on one spool volume: no crash, every row exactly once."""
    ids = []
    for n in range(6):
        batch = [f"req-shared-{n}-{secrets.token_hex(3)}" for _ in range(3)]
        ids += batch
        data = b"".join(msgspec.json.encode(_row(i)) + b"\n" for i in batch)
        _put(tmp_path / f"{n:020d}-{secrets.token_hex(4)}-audit.jsonl", data)
    first, second = AuditWriter(store.pool, tmp_path), AuditWriter(store.pool, tmp_path)
    results = await asyncio.gather(first.replay_spool(), second.replay_spool())
    assert sum(results) >= 6
    assert await _count(store, ids) == 18
    assert _names(tmp_path) == []


async def test_prompt_rows_replayed_by_two_writers_land_once(store: Store, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ids = [f"req-prompt-{secrets.token_hex(4)}" for _ in range(5)]
    data = b"".join(
        msgspec.json.encode(
            PromptRow(
                request_id=i,
                tenant_id=7,
                key_id=8,
                created_at=now,
                expires_at=now + timedelta(days=1),
                request_text="q",
                response_text="a",
            )
        )
        + b"\n"
        for i in ids
    )
    for n in range(4):  # the same rows spooled four times (retries, replicas)
        _put(tmp_path / f"{n:020d}-{secrets.token_hex(4)}-prompt.jsonl", data)
    first, second = AuditWriter(store.pool, tmp_path), AuditWriter(store.pool, tmp_path)
    await asyncio.gather(first.replay_spool(), second.replay_spool())
    count = await store.pool.fetchval(
        "SELECT count(*) FROM prompt_log WHERE request_id = ANY($1::text[])", ids
    )
    assert count == 5
    assert _names(tmp_path) == []


# A writer in a process of its own: rows submitted, then it waits (flush interval 60 s).
_SUBMIT_AND_WAIT = """
import asyncio, sys
from tests.integration.test_proxy_audit_writer import _prompt, _row
from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.postgres.store import open_pool

async def main(url, spool, ids):
    pool = await open_pool(url, min_size=1, max_size=1)
    writer = AuditWriter(pool, spool, flush_interval=60, batch_size=1000)
    await writer.start()
    for request_id in ids:
        writer.submit(_row(request_id))
        writer.submit(_prompt(request_id))
    print("submitted", flush=True)
    await asyncio.sleep(600)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""


def _prompt(request_id: str) -> PromptRow:
    now = datetime.now(UTC)
    return PromptRow(
        request_id=request_id,
        tenant_id=7,
        key_id=8,
        created_at=now,
        expires_at=now + timedelta(days=1),
        request_text="q",
        response_text="a",
    )


async def test_rows_of_a_writer_killed_before_its_flush_are_replayed_from_its_journal(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    """SIGKILL with every row still queued: the next writer on the directory writes them all."""
    ids = [f"req-killed-{secrets.token_hex(4)}" for _ in range(40)]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SUBMIT_AND_WAIT,
        database_url,
        str(tmp_path),
        *ids,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(60):
            assert await child.stdout.readline() == b"submitted\n"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert await _count(store, ids) == 0  # nothing reached Postgres before the kill
    (journal,) = [tmp_path / n for n in _names(tmp_path)]
    _append(journal, b'a{"request_id":"req-torn')  # a write the kill cut short
    writer = AuditWriter(store.pool, tmp_path)
    await writer.start()
    assert writer.pending_since() == 0.0  # counted in the census before it is replayed
    await writer.replay_spool()
    await writer.stop()
    assert await _count(store, ids) == 40
    prompts = await store.pool.fetchval(
        "SELECT count(*) FROM prompt_log WHERE request_id = ANY($1::text[])", ids
    )
    assert prompts == 40
    assert _names(tmp_path) == []
