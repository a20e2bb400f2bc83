"""Which write failures keep a row for a retry (spool) and which set it aside for good."""

from __future__ import annotations

import asyncpg
import pytest

from neuronetz_gateway.adapters.audit_writer import _transient


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
    ],
)
def test_a_failure_of_the_connection_or_client_keeps_the_row(exc: BaseException) -> None:
    assert _transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.StringDataRightTruncationError("value too long"),
        asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"),
    ],
)
def test_a_row_postgres_refuses_is_set_aside(exc: BaseException) -> None:
    assert not _transient(exc)
