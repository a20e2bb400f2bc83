"""piccolo's configuration: the engine from ``NZ_DATABASE_URL``, and our one app.

Selected with ``PICCOLO_CONF=neuronetz_gateway.adapters.postgres.piccolo_conf``
(the ``migrate`` command sets it).
"""

from __future__ import annotations

import os

from piccolo.conf.apps import AppRegistry
from piccolo.engine.postgres import PostgresEngine

__all__ = ["APP_REGISTRY", "DB"]

DB = PostgresEngine(
    config={
        "dsn": os.environ.get("NZ_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/neuronetz")
    },
    log_queries=False,
)

APP_REGISTRY = AppRegistry(apps=["neuronetz_gateway.adapters.postgres.piccolo_app"])
