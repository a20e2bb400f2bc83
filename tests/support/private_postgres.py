"""A migrated database in a Postgres cluster of the test's own (it may stop and start it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from tests.support.servers import ThrowawayPostgres

__all__ = ["private_database"]


@asynccontextmanager
async def private_database(name: str) -> AsyncIterator[tuple[ThrowawayPostgres, str]]:
    """A throwaway cluster with database ``name`` migrated; yields it and the database URL."""
    pg = ThrowawayPostgres()
    try:
        conn = await asyncpg.connect(pg.admin_url)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        url = pg.admin_url.rsplit("/", 1)[0] + f"/{name}"
        # a subprocess: piccolo keeps the first engine it configured for the whole process
        await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "neuronetz-gateway"), "migrate"],
            env={**os.environ, "NZ_DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield pg, url
    finally:
        pg.destroy()
