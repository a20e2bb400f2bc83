"""Apply piccolo migrations to ``NZ_DATABASE_URL``; applying twice is a no-op."""

from __future__ import annotations

import contextlib
import io
import os

__all__ = ["MigrationFailed", "apply_migrations"]

_CONF = "neuronetz_gateway.adapters.postgres.piccolo_conf"


class MigrationFailed(RuntimeError):
    """piccolo reported a failed migration."""


async def apply_migrations(database_url: str) -> str:
    """Run every pending migration; return piccolo's report of what it did."""
    os.environ["NZ_DATABASE_URL"] = database_url
    os.environ["PICCOLO_CONF"] = _CONF
    # Imported late: piccolo reads PICCOLO_CONF when its finder first runs.
    from piccolo.apps.migrations.commands.forwards import run_forwards

    from neuronetz_gateway.adapters.postgres import piccolo_conf

    # The conf module builds its engine once, at first import: a later call in the
    # same process (task bench migrates two databases) must point it at this one.
    piccolo_conf.DB.config = {**piccolo_conf.DB.config, "dsn": database_url}

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = await run_forwards(app_name="gateway", migration_id="all")
    if not result.success:
        raise MigrationFailed(result.message or report.getvalue())
    return report.getvalue()
