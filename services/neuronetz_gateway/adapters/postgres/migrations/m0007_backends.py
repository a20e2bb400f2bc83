"""``backend``: the Ollama servers behind the gateway; ``tenant.weight`` for fair admission.

Every change to a backend row sends ``pg_notify('nz_backend_events',
'backend:<name>')``, so every proxy replica reloads its backend directory
within moments (a channel of its own: the auth replicas evict keys on
anything they do not recognise on ``nz_key_events``). ``tenant.weight``
(NULL = 1) is the tenant's share when requests queue for backend slots; the
existing tenant trigger already notifies when it changes.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-12-02T16:40:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "backends, their change notifications, tenant weights"

_FORWARDS = [
    """
    CREATE TABLE IF NOT EXISTS backend (
        id serial PRIMARY KEY,
        name varchar(100) NOT NULL UNIQUE,
        url text NOT NULL,
        slots integer NOT NULL CHECK (slots BETWEEN 1 AND 4096),
        weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
        state varchar(16) NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining')),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE OR REPLACE FUNCTION nz_notify_backend_change() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('nz_backend_events', 'backend:' || OLD.name);
            RETURN OLD;
        END IF;
        PERFORM pg_notify('nz_backend_events', 'backend:' || NEW.name);
        RETURN NEW;
    END;
    $$ LANGUAGE plpgsql
    """,
    "DROP TRIGGER IF EXISTS backend_changed ON backend",
    """
    CREATE TRIGGER backend_changed AFTER INSERT OR UPDATE OR DELETE ON backend
    FOR EACH ROW EXECUTE FUNCTION nz_notify_backend_change()
    """,
    "ALTER TABLE tenant ADD COLUMN IF NOT EXISTS weight integer"
    " CHECK (weight IS NULL OR weight BETWEEN 1 AND 1000)",
]

_BACKWARDS = [
    "ALTER TABLE tenant DROP COLUMN IF EXISTS weight",
    "DROP TRIGGER IF EXISTS backend_changed ON backend",
    "DROP FUNCTION IF EXISTS nz_notify_backend_change()",
    "DROP TABLE IF EXISTS backend",
]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
