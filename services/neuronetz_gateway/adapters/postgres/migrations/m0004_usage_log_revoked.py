"""``usage_log.revoked``: the request was ended because its key was revoked mid-flight.

The proxies LISTEN on ``nz_key_events`` and end a revoked key's running
streams (issue 10); the row says so, beside the tokens charged so far.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-12-02T13:00:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "usage_log.revoked"

_FORWARDS = [
    "ALTER TABLE usage_log ADD COLUMN IF NOT EXISTS revoked boolean NOT NULL DEFAULT false",
]

_BACKWARDS = ["ALTER TABLE usage_log DROP COLUMN IF EXISTS revoked"]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
