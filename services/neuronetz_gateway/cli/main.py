"""The operator CLI, ``neuronetz-gateway``: tenants, keys, limits, usage, audit.

Every command prints one line of error and exits non-zero on bad input; no
tracebacks reach the operator. Listing commands take ``--json``.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.migrate import MigrationFailed, apply_migrations
from neuronetz_gateway.adapters.postgres.store import (
    MAX_DAYS,
    KeyRecord,
    Store,
    TenantRecord,
    expiry_from_days,
    models_list,
)
from neuronetz_gateway.cli.backends import backend_app
from neuronetz_gateway.cli.common import fail, iso, print_json, run_with_store
from neuronetz_gateway.cli.dev import dev
from neuronetz_gateway.cli.doctor import doctor
from neuronetz_gateway.cli.serve import serve
from neuronetz_gateway.domain.errors import GatewayError, InvalidInput
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys
from neuronetz_gateway.domain.keys import generate_key, is_valid_prefix
from neuronetz_gateway.domain.policy import POLICY_FIELDS, PolicySettings, check_policy_value
from neuronetz_gateway.settings import SettingsError, load_database_url, load_gateway_secret

__all__ = ["app", "main"]

app = typer.Typer(
    name="neuronetz-gateway",
    help="Operate the Neuronetz gateway: tenants, API keys, limits, usage and the services.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")

# The limit/budget/model options shared by create-tenant, create-key and set-limits.
Rpm = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
Tpm = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
Concurrency = Annotated[int | None, typer.Option("--concurrency", help="Concurrent requests.")]
Daily = Annotated[int | None, typer.Option("--daily-tokens", help="Token budget per UTC day.")]
Monthly = Annotated[
    int | None, typer.Option("--monthly-tokens", help="Token budget per UTC calendar month.")
]
Total = Annotated[int | None, typer.Option("--total-tokens", help="Token budget, all time.")]
Models = Annotated[
    str | None,
    typer.Option("--models", help="Comma-separated allowed models, e.g. llama3.2,qwen2.5"),
]
AllModels = Annotated[
    bool, typer.Option("--allow-all-models", help="Allow every installed model (the default).")
]
MaxCtx = Annotated[int | None, typer.Option("--max-num-ctx", help="Cap on options.num_ctx.")]
MaxPredict = Annotated[
    int | None,
    typer.Option("--max-num-predict", help="Cap on options.num_predict / max_tokens."),
]
KeepAlive = Annotated[
    bool | None,
    typer.Option(
        "--allow-keep-alive/--forbid-keep-alive",
        help="Whether requests may set keep_alive to 0 or negative (unload/pin a shared model).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Weight = Annotated[
    int | None,
    typer.Option(
        "--weight", help="The tenant's share when requests queue for backend slots (default 1)."
    ),
]


_fail = fail
_run = run_with_store


def _policy(
    *,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
    daily_tokens: int | None,
    monthly_tokens: int | None,
    total_tokens: int | None,
    models: str | None,
    allow_all_models: bool,
    max_num_ctx: int | None,
    max_num_predict: int | None,
    allow_keep_alive: bool | None,
) -> dict[str, object]:
    """The options the operator gave, as policy column changes."""
    if models is not None and allow_all_models:
        raise InvalidInput("give --models or --allow-all-models, not both")
    given: dict[str, object] = {
        name: value
        for name, value in (
            ("rpm", rpm),
            ("tpm", tpm),
            ("concurrency", concurrency),
            ("daily_tokens", daily_tokens),
            ("monthly_tokens", monthly_tokens),
            ("total_tokens", total_tokens),
            ("max_num_ctx", max_num_ctx),
            ("max_num_predict", max_num_predict),
            ("allow_keep_alive_override", allow_keep_alive),
        )
        if value is not None
    }
    for name, value in given.items():
        check_policy_value(name, value)
    if models is not None:
        given["models"] = models_list(models)
    if allow_all_models:
        given["models"] = None
    return given


def _tenant_json(t: TenantRecord) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, **_policy_json(t.policy), "weight": t.weight}


def _policy_json(p: PolicySettings) -> dict[str, Any]:
    out: dict[str, Any] = {f: getattr(p, f) for f in POLICY_FIELDS}
    out["models"] = None if p.models is None else list(p.models)
    return out


_iso = iso


def _key_status(k: KeyRecord, now: datetime) -> str:
    if k.revoked_at is not None:
        return "revoked"
    if k.expires_at is not None and k.expires_at <= now:
        return "expired"
    return "active"


def _key_json(k: KeyRecord, now: datetime) -> dict[str, Any]:
    return {
        "prefix": k.prefix,
        "name": k.name,
        "tenant": k.tenant_name,
        "status": _key_status(k, now),
        "created_at": _iso(k.created_at),
        "expires_at": _iso(k.expires_at),
        "revoked_at": _iso(k.revoked_at),
        "previous_valid_until": _iso(k.previous_valid_until),
        "log_prompts": k.log_prompts,
        "prompt_ttl_days": k.prompt_ttl_days,
        "overrides": _policy_json(k.policy),
    }


_print_json = print_json


def _fingerprint(full_key: str) -> str | None:
    """The new key's fingerprint under ``NZ_GATEWAY_SECRET``, when this shell has it.

    Without it the key is stored hash-only and the auth service adds the
    fingerprint on first use; until then a flood of wrong secrets on its prefix
    can delay it (the Argon2 budget), so the command says so (after it worked).
    """
    secret = load_gateway_secret()
    return None if secret is None else FingerprintKeys(secret).make(full_key)


def _note_missing_fingerprint(fingerprint: str | None) -> None:
    if fingerprint is None:
        typer.echo(
            "note: NZ_GATEWAY_SECRET is not set here, so the key is stored without its "
            "fingerprint; the auth service adds it on first use",
            err=True,
        )


def _check_prefix(prefix: str) -> None:
    if not is_valid_prefix(prefix):
        raise InvalidInput(f"{prefix!r} is not a key prefix (nz_ followed by 8 characters)")


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (safe to run again)."""
    try:
        report = asyncio.run(apply_migrations(load_database_url()))
    except (SettingsError, MigrationFailed) as exc:
        _fail(str(exc))
    except (OSError, asyncpg.PostgresError) as exc:
        _fail(f"database error: {type(exc).__name__}: {exc}".splitlines()[0])
    applied = report.count("[forwards]... ok")
    typer.echo(f"applied {applied} migration(s)" if applied else "schema up to date")


_POLICY_OPTIONS = (
    "rpm",
    "tpm",
    "concurrency",
    "daily_tokens",
    "monthly_tokens",
    "total_tokens",
    "models",
    "allow_all_models",
    "max_num_ctx",
    "max_num_predict",
    "allow_keep_alive",
)


def _policy_options(command_parameters: dict[str, Any]) -> dict[str, object]:
    """The shared limit/budget/model options of a command (its ``locals()``), validated."""
    try:
        return _policy(**{name: command_parameters[name] for name in _POLICY_OPTIONS})
    except GatewayError as exc:
        _fail(str(exc))


@app.command("create-tenant")
def create_tenant(
    name: Annotated[str, typer.Option("--name", help="Tenant name (unique).")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Concurrency = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    total_tokens: Total = None,
    models: Models = None,
    allow_all_models: AllModels = False,
    max_num_ctx: MaxCtx = None,
    max_num_predict: MaxPredict = None,
    allow_keep_alive: KeepAlive = None,
    weight: Weight = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant with its limits, budgets and models (unset = unlimited / all)."""
    changes = _policy_options(locals())
    policy = PolicySettings().updated(changes)
    tenant = _run(lambda store: store.create_tenant(name, policy, weight))
    if as_json:
        _print_json(_tenant_json(tenant))
    else:
        typer.echo(f"created tenant {tenant.name}")


@app.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant that owns the key.")],
    name: Annotated[str, typer.Option("--name", help="Key name (unique within the tenant).")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Concurrency = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    total_tokens: Total = None,
    models: Models = None,
    allow_all_models: AllModels = False,
    max_num_ctx: MaxCtx = None,
    max_num_predict: MaxPredict = None,
    allow_keep_alive: KeepAlive = None,
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", help="The key stops working after N days.")
    ] = None,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Store this key's prompts and responses.")
    ] = False,
    prompt_ttl_days: Annotated[
        int | None,
        typer.Option("--prompt-ttl-days", help="Keep logged prompts N days (default 30)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key; the full key is printed once and never again."""
    changes = _policy_options(locals())
    if prompt_ttl_days is not None and not log_prompts:
        _fail("--prompt-ttl-days goes with --log-prompts")
    if prompt_ttl_days is not None and not 0 < prompt_ttl_days <= MAX_DAYS:
        _fail(f"--prompt-ttl-days must be between 1 and {MAX_DAYS}")
    ttl = (prompt_ttl_days or DEFAULT_PROMPT_TTL_DAYS) if log_prompts else None
    key = generate_key()
    secret_hash = KeyHasher().hash(key.full)
    fingerprint = _fingerprint(key.full)

    async def work(store: Store) -> KeyRecord:
        return await store.create_key(
            tenant_name=tenant,
            name=name,
            prefix=key.prefix,
            secret_hash=secret_hash,
            secret_fingerprint=fingerprint,
            policy=PolicySettings().updated(changes),
            expires_at=expiry_from_days(datetime.now(UTC), expires_in_days),
            log_prompts=log_prompts,
            prompt_ttl_days=ttl,
        )

    record = _run(work)
    _note_missing_fingerprint(fingerprint)
    if as_json:
        _print_json(
            {
                "key": key.full,
                "prefix": record.prefix,
                "tenant": record.tenant_name,
                "name": record.name,
            }
        )
    else:
        typer.echo(f"created key {record.name} for tenant {record.tenant_name}")
        typer.echo(f"prefix: {record.prefix}")
        typer.echo(f"key:    {key.full}")
        typer.echo("Store the key now: it is shown only once.")


@app.command("list-keys")
def list_keys(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant whose keys to list.")],
    as_json: AsJson = False,
) -> None:
    """List a tenant's keys (prefix, name, status; never a secret or hash)."""
    keys = _run(lambda store: store.list_keys(tenant))
    now = datetime.now(UTC)
    if as_json:
        _print_json([_key_json(k, now) for k in keys])
        return
    for k in keys:
        expires = _iso(k.expires_at) or "never"
        typer.echo(f"{k.prefix}  {k.name:<24} {_key_status(k, now):<8} expires {expires}")


@app.command("revoke-key")
def revoke_key(
    prefix: Annotated[str, typer.Option("--prefix", help="Key prefix, e.g. nz_abc12345.")],
    as_json: AsJson = False,
) -> None:
    """Revoke a key; every auth replica refuses it within a second."""
    try:
        _check_prefix(prefix)
    except GatewayError as exc:
        _fail(str(exc))
    record = _run(lambda store: store.revoke_key(prefix))
    if as_json:
        _print_json(_key_json(record, datetime.now(UTC)))
    else:
        typer.echo(f"revoked {record.prefix}")


@app.command("rotate-key")
def rotate_key(
    prefix: Annotated[str, typer.Option("--prefix", help="Key prefix, e.g. nz_abc12345.")],
    grace_seconds: Annotated[
        int, typer.Option("--grace-seconds", help="How long the old secret keeps working.")
    ] = 0,
    as_json: AsJson = False,
) -> None:
    """Give a key a new secret; limits, budgets, usage and models carry over."""
    try:
        _check_prefix(prefix)
        if grace_seconds < 0:
            raise InvalidInput("--grace-seconds must not be negative")
    except GatewayError as exc:
        _fail(str(exc))
    key = generate_key(prefix)
    new_hash = KeyHasher().hash(key.full)
    fingerprint = _fingerprint(key.full)
    record = _run(lambda store: store.rotate_key(prefix, new_hash, grace_seconds, fingerprint))
    _note_missing_fingerprint(fingerprint)
    if as_json:
        _print_json(
            {
                "key": key.full,
                "prefix": record.prefix,
                "tenant": record.tenant_name,
                "name": record.name,
                "previous_valid_until": _iso(record.previous_valid_until),
            }
        )
    else:
        typer.echo(f"rotated {record.prefix}")
        typer.echo(f"key:    {key.full}")
        until = _iso(record.previous_valid_until)
        typer.echo(f"old secret valid until {until}" if until else "old secret no longer valid")


@app.command("set-limits")
def set_limits(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Change a tenant.")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Change one key.")] = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Concurrency = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    total_tokens: Total = None,
    models: Models = None,
    allow_all_models: AllModels = False,
    max_num_ctx: MaxCtx = None,
    max_num_predict: MaxPredict = None,
    allow_keep_alive: KeepAlive = None,
    clear: Annotated[
        str | None,
        typer.Option(
            "--clear",
            help="Comma-separated settings to unset: back to unlimited on a tenant, to "
            "inherit on a key (e.g. rpm,daily-tokens,models).",
        ),
    ] = None,
    weight: Weight = None,
    as_json: AsJson = False,
) -> None:
    """Change limits, budgets, models, caps (or a tenant's weight) of a tenant or a key."""
    if (tenant is None) == (prefix is None):
        _fail("give exactly one of --tenant or --prefix")
    changes = _policy_options(locals())
    new_weight: int | object | None = _UNCHANGED if weight is None else weight
    for raw in (clear or "").split(","):
        field = raw.strip().replace("-", "_")
        if not field:
            continue
        if field == "weight" and tenant is not None:
            if weight is not None:
                _fail(f"--clear {raw.strip()} conflicts with a value given for it")
            new_weight = None
            continue
        if field not in POLICY_FIELDS:
            _fail(f"--clear: unknown setting {raw.strip()!r}")
        if field in changes:
            _fail(f"--clear {raw.strip()} conflicts with a value given for it")
        changes[field] = None
    if prefix is not None and weight is not None:
        _fail("--weight is a tenant's setting; give --tenant")
    if prefix is not None:
        try:
            _check_prefix(prefix)
        except GatewayError as exc:
            _fail(str(exc))
        key = _run(lambda store: store.update_key_policy(prefix, changes))
        if as_json:
            _print_json(_key_json(key, datetime.now(UTC)))
        else:
            typer.echo(f"updated key {key.prefix}")
        return
    tenant_name = tenant or ""

    async def update_tenant(store: Store) -> TenantRecord:
        if new_weight is _UNCHANGED:
            return await store.update_tenant_policy(tenant_name, changes)
        async with store.pool.acquire() as conn, conn.transaction():
            in_tx = Store(conn)
            record = await in_tx.set_tenant_weight(tenant_name, new_weight)  # type: ignore[arg-type]
            if changes:
                record = await in_tx.update_tenant_policy(tenant_name, changes)
            return record

    record = _run(update_tenant)
    if as_json:
        _print_json(_tenant_json(record))
    else:
        typer.echo(f"updated tenant {record.name}")


@app.command()
def usage(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant to report.")],
    prefix: Annotated[str | None, typer.Option("--prefix", help="Only this key.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="ISO 8601 start time (UTC if no offset).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Total requests and tokens from the audit ledger."""
    start: datetime | None = None
    if since is not None:
        try:
            start = datetime.fromisoformat(since)
        except ValueError:
            _fail(f"--since must be an ISO 8601 time, got {since!r}")
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
    totals = _run(lambda store: store.usage(tenant, prefix, start))
    if as_json:
        _print_json(
            {
                "tenant": tenant,
                "prefix": prefix,
                "since": _iso(start),
                "requests": totals.requests,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                "total_tokens": totals.total_tokens,
            }
        )
    else:
        typer.echo(
            f"requests {totals.requests}  prompt_tokens {totals.prompt_tokens}  "
            f"completion_tokens {totals.completion_tokens}  total_tokens {totals.total_tokens}"
        )


@app.command()
def audit(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant to show.")],
    limit: Annotated[int, typer.Option("--limit", help="How many rows, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """The newest audit rows of a tenant."""
    rows = _run(lambda store: store.audit(tenant, limit))
    if as_json:
        _print_json([{**r, "ts": _iso(r["ts"])} for r in rows])
        return
    for r in rows:
        typer.echo(
            f"{_iso(r['ts'])} {r['request_id']} {r['key_prefix']} {r['route']} {r['model'] or '-'}"
            f" {r['status']} p={r['prompt_tokens']} c={r['completion_tokens']}"
            f" {r['duration_ms']}ms{' disconnected' if r['client_disconnected'] else ''}"
            f"{' revoked' if r['revoked'] else ''}"
        )


@app.command("purge-prompts")
def purge_prompts() -> None:
    """Delete logged prompts past their retention."""
    deleted = _run(lambda store: store.purge_prompts(datetime.now(UTC)))
    typer.echo(f"deleted {deleted} expired prompt log(s)")


DEFAULT_PROMPT_TTL_DAYS = 30
_UNCHANGED = object()

app.command("serve")(serve)
app.command("dev")(dev)
app.command("doctor")(doctor)
app.add_typer(backend_app, name="backend")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
