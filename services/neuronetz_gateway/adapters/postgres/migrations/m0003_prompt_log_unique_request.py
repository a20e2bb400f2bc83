"""One prompt log row per request: replays from a shared spool insert it once.

``usage_log.request_id`` was unique from the start; ``prompt_log`` relied on
a ``NOT EXISTS`` check, which two replicas replaying the same spool file at
the same moment could both pass.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-11-26T09:00:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "unique prompt_log.request_id"

_FORWARDS = [
    # keep the first row of any request logged twice before this migration
    "DELETE FROM prompt_log a USING prompt_log b WHERE a.request_id = b.request_id AND a.id > b.id",
    "CREATE UNIQUE INDEX IF NOT EXISTS prompt_log_request_id_uq ON prompt_log (request_id)",
]

_BACKWARDS = ["DROP INDEX IF EXISTS prompt_log_request_id_uq"]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
