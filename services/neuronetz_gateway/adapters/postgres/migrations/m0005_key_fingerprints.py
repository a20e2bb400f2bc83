"""Keyed fingerprints beside the Argon2id hashes (``domain/key_fingerprints.py``).

``secret_fingerprint`` belongs to ``secret_hash``, ``previous_fingerprint`` to
``previous_hash``. NULL means "none yet": the key is verified with Argon2 and
its fingerprint stored then. Keys that exist before this migration get theirs
on their first successful use.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-12-02T16:05:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "api_key fingerprints"

_FORWARDS = [
    "ALTER TABLE api_key ADD COLUMN IF NOT EXISTS secret_fingerprint text",
    "ALTER TABLE api_key ADD COLUMN IF NOT EXISTS previous_fingerprint text",
]

_BACKWARDS = [
    "ALTER TABLE api_key DROP COLUMN IF EXISTS previous_fingerprint",
    "ALTER TABLE api_key DROP COLUMN IF EXISTS secret_fingerprint",
]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
