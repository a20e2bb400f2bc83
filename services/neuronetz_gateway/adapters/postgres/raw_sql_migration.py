"""Migrations written as plain SQL statements, for what piccolo's tables cannot say.

Lives beside ``migrations/``, not in it: piccolo imports every module there
as a migration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from piccolo.apps.migrations.auto.migration_manager import MigrationManager

__all__ = ["raw_sql_migration"]


def raw_sql_migration(
    migration_id: str, description: str, forwards: Sequence[str], backwards: Sequence[str]
) -> Callable[[], Awaitable[MigrationManager]]:
    """A piccolo ``forwards()`` that runs ``forwards`` in order (``backwards`` to undo)."""

    async def run(statements: Sequence[str]) -> None:
        from neuronetz_gateway.adapters.postgres.tables import Tenant

        for statement in statements:
            await Tenant.raw(statement)

    # piccolo awaits only coroutine functions (a lambda's coroutine would be dropped)
    async def run_forwards() -> None:
        await run(forwards)

    async def run_backwards() -> None:
        await run(backwards)

    async def manager() -> MigrationManager:
        migration = MigrationManager(
            migration_id=migration_id, app_name="gateway", description=description
        )
        migration.add_raw(run_forwards)
        migration.add_raw_backwards(run_backwards)
        return migration

    return manager
