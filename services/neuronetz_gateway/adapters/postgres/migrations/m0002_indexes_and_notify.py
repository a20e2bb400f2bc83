"""Per-tenant key names, ledger indexes for per-period sums, and the change signal.

Triggers on ``api_key`` and ``tenant`` send ``pg_notify('nz_key_events', ...)``
with ``key:<prefix>`` or ``tenant:<id>`` so every auth replica evicts what it
cached about them within moments of a revoke, rotate or limit change.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-11-26T07:30:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "indexes, per-tenant key names, change notifications"

_FORWARDS = [
    "CREATE UNIQUE INDEX IF NOT EXISTS api_key_tenant_name_uq ON api_key (tenant, name)",
    "CREATE INDEX IF NOT EXISTS usage_log_tenant_ts_idx ON usage_log (tenant_id, ts)",
    "CREATE INDEX IF NOT EXISTS usage_log_key_ts_idx ON usage_log (key_id, ts)",
    """
    CREATE OR REPLACE FUNCTION nz_notify_key_change() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('nz_key_events', 'key:' || OLD.prefix);
            RETURN OLD;
        END IF;
        PERFORM pg_notify('nz_key_events', 'key:' || NEW.prefix);
        RETURN NEW;
    END;
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE OR REPLACE FUNCTION nz_notify_tenant_change() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('nz_key_events', 'tenant:' || OLD.id);
            RETURN OLD;
        END IF;
        PERFORM pg_notify('nz_key_events', 'tenant:' || NEW.id);
        RETURN NEW;
    END;
    $$ LANGUAGE plpgsql
    """,
    "DROP TRIGGER IF EXISTS api_key_changed ON api_key",
    """
    CREATE TRIGGER api_key_changed AFTER UPDATE OR DELETE ON api_key
    FOR EACH ROW EXECUTE FUNCTION nz_notify_key_change()
    """,
    "DROP TRIGGER IF EXISTS tenant_changed ON tenant",
    """
    CREATE TRIGGER tenant_changed AFTER UPDATE OR DELETE ON tenant
    FOR EACH ROW EXECUTE FUNCTION nz_notify_tenant_change()
    """,
]

_BACKWARDS = [
    "DROP TRIGGER IF EXISTS tenant_changed ON tenant",
    "DROP TRIGGER IF EXISTS api_key_changed ON api_key",
    "DROP FUNCTION IF EXISTS nz_notify_tenant_change()",
    "DROP FUNCTION IF EXISTS nz_notify_key_change()",
    "DROP INDEX IF EXISTS usage_log_key_ts_idx",
    "DROP INDEX IF EXISTS usage_log_tenant_ts_idx",
    "DROP INDEX IF EXISTS api_key_tenant_name_uq",
]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
