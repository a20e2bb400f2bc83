"""The piccolo app that owns the gateway's tables and migrations."""

from __future__ import annotations

import os

from piccolo.conf.apps import AppConfig

from neuronetz_gateway.adapters.postgres.tables import ApiKey, PromptLog, Tenant, UsageLog

__all__ = ["APP_CONFIG"]

APP_CONFIG = AppConfig(
    app_name="gateway",
    migrations_folder_path=os.path.join(os.path.dirname(__file__), "migrations"),
    table_classes=[Tenant, ApiKey, UsageLog, PromptLog],
    migration_dependencies=[],
    commands=[],
)
