"""The schema, as piccolo tables. Migrations in ``migrations/`` create it.

The services read and write with hand-written SQL on the same asyncpg pool
(see :mod:`neuronetz_gateway.adapters.postgres.store`); these classes are the
schema's single description and the source of the migrations.
"""

from __future__ import annotations

from piccolo.columns import (
    JSONB,
    BigInt,
    BigSerial,
    Boolean,
    ForeignKey,
    Integer,
    Text,
    Timestamptz,
    Varchar,
)
from piccolo.columns.defaults.timestamptz import TimestamptzNow
from piccolo.table import Table

__all__ = ["ApiKey", "Backend", "PromptLog", "Tenant", "UsageLog"]


class Tenant(Table, tablename="tenant"):
    """A customer; owns keys. Limit columns: NULL = unlimited; models NULL = all."""

    name = Varchar(length=100, unique=True, null=False)
    rpm = Integer(null=True, default=None)
    tpm = BigInt(null=True, default=None)
    concurrency = Integer(null=True, default=None)
    daily_tokens = BigInt(null=True, default=None)
    monthly_tokens = BigInt(null=True, default=None)
    total_tokens = BigInt(null=True, default=None)
    models = JSONB(null=True, default=None)
    max_num_ctx = Integer(null=True, default=None)
    max_num_predict = Integer(null=True, default=None)
    allow_keep_alive_override = Boolean(null=True, default=None)
    created_at = Timestamptz(default=TimestamptzNow())
    # share when requests queue for backend slots, NULL = 1 (migration m0007, plain SQL)
    weight = Integer(null=True, default=None)


class ApiKey(Table, tablename="api_key"):
    """An API key identity. Override columns: NULL = inherit from the tenant."""

    tenant = ForeignKey(references=Tenant, null=False)
    name = Varchar(length=100, null=False)
    prefix = Varchar(length=11, unique=True, null=False)
    secret_hash = Text(null=False)
    previous_hash = Text(null=True, default=None)
    previous_valid_until = Timestamptz(null=True, default=None)
    # keyed fingerprints of secret_hash / previous_hash (migrations m0005, m0006)
    secret_fingerprint = Text(null=True, default=None)
    previous_fingerprint = Text(null=True, default=None)
    expires_at = Timestamptz(null=True, default=None)
    revoked_at = Timestamptz(null=True, default=None)
    log_prompts = Boolean(default=False)
    prompt_ttl_days = Integer(null=True, default=None)
    rpm = Integer(null=True, default=None)
    tpm = BigInt(null=True, default=None)
    concurrency = Integer(null=True, default=None)
    daily_tokens = BigInt(null=True, default=None)
    monthly_tokens = BigInt(null=True, default=None)
    total_tokens = BigInt(null=True, default=None)
    models = JSONB(null=True, default=None)
    max_num_ctx = Integer(null=True, default=None)
    max_num_predict = Integer(null=True, default=None)
    allow_keep_alive_override = Boolean(null=True, default=None)
    created_at = Timestamptz(default=TimestamptzNow())


class UsageLog(Table, tablename="usage_log"):
    """The audit ledger: one row per request; ``request_id`` makes replays idempotent."""

    id = BigSerial(primary_key=True)
    request_id = Varchar(length=64, unique=True, null=False)
    ts = Timestamptz(default=TimestamptzNow())
    tenant_id = Integer(null=False)
    key_id = Integer(null=False)
    key_prefix = Varchar(length=11, null=False)
    route = Varchar(length=64, null=False)
    model = Varchar(length=200, null=True, default=None)
    status = Integer(null=False)
    prompt_tokens = Integer(default=0)
    completion_tokens = Integer(default=0)
    ttfb_ms = Integer(null=True, default=None)
    duration_ms = Integer(default=0)
    streamed = Boolean(default=False)
    client_disconnected = Boolean(default=False)
    estimated = Boolean(default=False)
    revoked = Boolean(default=False)  # added by migration m0004 (plain SQL)


class PromptLog(Table, tablename="prompt_log"):
    """Opt-in prompt/response text, deleted after ``expires_at``."""

    id = BigSerial(primary_key=True)
    request_id = Varchar(length=64, null=False, unique=True)  # unique index: migration m0003
    tenant_id = Integer(null=False)
    key_id = Integer(null=False)
    created_at = Timestamptz(default=TimestamptzNow())
    expires_at = Timestamptz(null=False, index=True)
    request_text = Text(null=False)
    response_text = Text(null=False, default="")


class Backend(Table, tablename="backend"):
    """An Ollama server behind the gateway (created by migration m0007, plain SQL).

    ``state``: ``active`` or ``draining``; changes notify ``nz_backend_events``.
    """

    name = Varchar(length=100, unique=True, null=False)
    url = Text(null=False)
    slots = Integer(null=False)
    weight = Integer(null=False, default=1)
    state = Varchar(length=16, null=False, default="active")
    created_at = Timestamptz(default=TimestamptzNow())
    updated_at = Timestamptz(default=TimestamptzNow())
