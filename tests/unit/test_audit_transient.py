"""Which write failures keep a row for a retry (spool) and which set it aside for good."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import asyncpg
import pytest

from neuronetz_gateway.adapters.audit_writer import AuditWriter, _transient
from neuronetz_gateway.domain.accounting import AuditRow


@pytest.mark.parametrize(
    "exc",
    [
        # seen as Postgres stopped under a one-row batch: the row went to .bad, lost
        asyncpg.exceptions.InternalClientError("unexpected state"),
        asyncpg.exceptions.OutdatedSchemaCacheError("cache"),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        ConnectionRefusedError(),
        TimeoutError(),
        # not the row's fault either: a schema not migrated yet, an error nobody foresaw
        asyncpg.exceptions.UndefinedColumnError("column does not exist"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
        RuntimeError("unforeseen"),
    ],
)
def test_a_failure_of_the_connection_or_client_keeps_the_row(exc: BaseException) -> None:
    assert _transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.StringDataRightTruncationError("value too long"),
        asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        ValueError("a value the client cannot encode"),  # asyncpg's client-side DataError
    ],
)
def test_a_row_postgres_refuses_is_set_aside(exc: BaseException) -> None:
    assert not _transient(exc)


def _spool_contents(folder: Path) -> tuple[list[str], bytes]:
    """The spool's file names and the first file's bytes (blocking: after the writer stopped)."""
    paths = sorted(folder.iterdir())
    return [p.name for p in paths], paths[0].read_bytes() if paths else b""


class _DyingConnection:
    async def executemany(self, statement: str, args: object) -> None:
        # what asyncpg raised in the outage test as Postgres stopped under the write
        raise asyncpg.exceptions.InternalClientError("not connected")


class _DyingPool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_DyingConnection]:
        yield _DyingConnection()


async def test_a_one_row_batch_whose_connection_dies_is_spooled_not_set_aside(
    tmp_path: Path,
) -> None:
    writer = AuditWriter(cast("asyncpg.Pool", _DyingPool()), tmp_path, flush_interval=0.01)
    await writer.start()
    writer.submit(
        AuditRow(
            request_id="req-warm",
            ts=datetime.now(UTC),
            tenant_id=1,
            key_id=2,
            key_prefix="nz_abc12345",
            route="chat",
            model="llama3.2",
            status=200,
            prompt_tokens=1,
            completion_tokens=1,
            ttfb_ms=1,
            duration_ms=1,
            streamed=False,
            client_disconnected=False,
            estimated=False,
        )
    )
    await writer.stop()
    names, first = _spool_contents(tmp_path)
    assert [n.rsplit(".", 1)[-1] for n in names] == ["jsonl"], names  # kept for replay, no .bad
    assert b"req-warm" in first
