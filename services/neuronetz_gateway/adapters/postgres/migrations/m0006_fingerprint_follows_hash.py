"""A fingerprint never outlives its hash, and writing one alone evicts nothing.

``api_key_fingerprint_follows_hash`` (BEFORE UPDATE): an UPDATE that changes
``secret_hash`` (or ``previous_hash``) without setting its fingerprint clears
that fingerprint, so a hash changed by hand, by an older CLI or by a rehash
can never leave behind a fingerprint that still accepts the old secret.

``nz_notify_key_change`` (from m0002) no longer notifies for an UPDATE that
changes only the fingerprint columns: the auth service stores a key's
fingerprint on its first use, and that must not evict the key it just cached.
"""

from neuronetz_gateway.adapters.postgres.raw_sql_migration import raw_sql_migration

ID = "2026-12-02T16:06:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "fingerprints follow their hashes; fingerprint writes do not notify"

_FOLLOW = """
CREATE OR REPLACE FUNCTION nz_fingerprint_follows_hash() RETURNS trigger AS $$
BEGIN
    IF NEW.secret_hash IS DISTINCT FROM OLD.secret_hash
       AND NEW.secret_fingerprint IS NOT DISTINCT FROM OLD.secret_fingerprint THEN
        NEW.secret_fingerprint := NULL;
    END IF;
    IF NEW.previous_hash IS NULL
       OR (NEW.previous_hash IS DISTINCT FROM OLD.previous_hash
           AND NEW.previous_fingerprint IS NOT DISTINCT FROM OLD.previous_fingerprint) THEN
        NEW.previous_fingerprint := NULL;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql
"""

_NOTIFY_SKIPPING_FINGERPRINTS = """
CREATE OR REPLACE FUNCTION nz_notify_key_change() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('nz_key_events', 'key:' || OLD.prefix);
        RETURN OLD;
    END IF;
    IF (NEW.secret_fingerprint IS DISTINCT FROM OLD.secret_fingerprint
        OR NEW.previous_fingerprint IS DISTINCT FROM OLD.previous_fingerprint)
       AND to_jsonb(NEW) - 'secret_fingerprint' - 'previous_fingerprint'
           = to_jsonb(OLD) - 'secret_fingerprint' - 'previous_fingerprint' THEN
        RETURN NEW;
    END IF;
    PERFORM pg_notify('nz_key_events', 'key:' || NEW.prefix);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql
"""

_NOTIFY_M0002 = """
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
"""

_FORWARDS = [
    _FOLLOW,
    "DROP TRIGGER IF EXISTS api_key_fingerprint_follows_hash ON api_key",
    """
    CREATE TRIGGER api_key_fingerprint_follows_hash BEFORE UPDATE ON api_key
    FOR EACH ROW EXECUTE FUNCTION nz_fingerprint_follows_hash()
    """,
    _NOTIFY_SKIPPING_FINGERPRINTS,
]

_BACKWARDS = [
    _NOTIFY_M0002,
    "DROP TRIGGER IF EXISTS api_key_fingerprint_follows_hash ON api_key",
    "DROP FUNCTION IF EXISTS nz_fingerprint_follows_hash()",
]


forwards = raw_sql_migration(ID, DESCRIPTION, _FORWARDS, _BACKWARDS)
