"""What every operator command shares: one-line errors, the database, JSON output.

Every command prints one line of error and exits 1 on bad input or an
unreachable database; no traceback reaches the operator.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import NoReturn, TypeVar

import asyncpg
import typer

from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.domain.errors import GatewayError
from neuronetz_gateway.settings import SettingsError, load_database_url

__all__ = ["fail", "iso", "print_json", "run_with_store"]

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def run_with_store(work: Callable[[Store], Awaitable[T]]) -> T:
    """Open a pool, run ``work``, and turn every expected failure into one line."""

    async def go() -> T:
        pool = await open_pool(load_database_url(), min_size=1, max_size=2)
        try:
            return await work(Store(pool))
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except GatewayError as exc:
        fail(str(exc))
    except SettingsError as exc:
        fail(str(exc))
    except OverflowError as exc:
        fail(f"value out of range: {exc}")
    except asyncpg.UndefinedTableError:
        fail("the database is not migrated; run `neuronetz-gateway migrate` first")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(f"database error: {type(exc).__name__}: {exc}".splitlines()[0])


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def print_json(value: object) -> None:
    typer.echo(json.dumps(value, default=str, indent=None))
