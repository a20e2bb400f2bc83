"""apply_migrations on a second database in the same process migrates that database."""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from neuronetz_gateway.adapters.postgres.migrate import apply_migrations


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def test_a_second_database_is_migrated_not_the_first_again(
    pg_admin_url: str, database_url: str
) -> None:
    # database_url (the session's) was migrated first in this process, as in task bench
    name = f"nz_test_migrate_{secrets.token_hex(4)}"

    async def run() -> list[str]:
        conn = await asyncpg.connect(pg_admin_url)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        try:
            await apply_migrations(_with_database(pg_admin_url, name))
            conn = await asyncpg.connect(_with_database(pg_admin_url, name))
            try:
                rows = await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            finally:
                await conn.close()
            return sorted(r["tablename"] for r in rows)
        finally:
            conn = await asyncpg.connect(pg_admin_url)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()

    tables = asyncio.run(run())
    assert "tenant" in tables and "migration" in tables
