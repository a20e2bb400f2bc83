"""Tenants, keys and the ledger in Postgres, with hand-written SQL on one asyncpg pool.

The operator CLI and both services use this module; the schema is described
by :mod:`.tables` and created by the migrations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg

from neuronetz_gateway.domain.backends import BackendSpec, BackendState, check_weight
from neuronetz_gateway.domain.errors import Conflict, InvalidInput, NotFound
from neuronetz_gateway.domain.policy import PolicySettings, check_name, check_policy_value

__all__ = [
    "POLICY_COLUMNS",
    "AuthKeyRecord",
    "BackendRecord",
    "KeyRecord",
    "LedgerTotals",
    "Store",
    "TenantRecord",
    "UsageTotals",
    "open_pool",
]

POLICY_COLUMNS = tuple(f.name for f in fields(PolicySettings))


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool with JSONB decoded to Python values."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=10,
    )
    return pool


def _policy_from(row: Mapping[str, Any]) -> PolicySettings:
    values = {c: row[c] for c in POLICY_COLUMNS}
    if values["models"] is not None:
        values["models"] = tuple(values["models"])
    return PolicySettings(**values)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: int
    name: str
    policy: PolicySettings
    created_at: datetime
    weight: int | None = None  # share in the backend queues (NULL = 1)


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """A backend row: the spec every proxy loads, plus its bookkeeping."""

    id: int
    spec: BackendSpec
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    tenant_id: int
    tenant_name: str
    name: str
    prefix: str
    policy: PolicySettings
    expires_at: datetime | None
    revoked_at: datetime | None
    previous_valid_until: datetime | None
    log_prompts: bool
    prompt_ttl_days: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuthKeyRecord:
    """What the auth service needs to verify a key and resolve its policy."""

    key: KeyRecord
    tenant: TenantRecord
    secret_hash: str
    previous_hash: str | None
    secret_fingerprint: str | None = None  # of secret_hash (domain.key_fingerprints)
    previous_fingerprint: str | None = None  # of previous_hash


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Tokens spent per period at one level, from the ledger (budget rebuilds)."""

    daily: int
    monthly: int
    total: int


def _one(row: Any) -> Mapping[str, Any]:
    """The row a statement that always returns one did return."""
    if row is None:  # pragma: no cover - aggregate and RETURNING statements always yield a row
        raise RuntimeError("expected a row from Postgres, got none")
    return cast("Mapping[str, Any]", row)


_KEY_SELECT = """
SELECT k.*, t.name AS tenant_name FROM api_key k JOIN tenant t ON t.id = k.tenant
"""


def _key_from(row: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        tenant_id=row["tenant"],
        tenant_name=row["tenant_name"],
        name=row["name"],
        prefix=row["prefix"],
        policy=_policy_from(row),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        previous_valid_until=row["previous_valid_until"],
        log_prompts=row["log_prompts"],
        prompt_ttl_days=row["prompt_ttl_days"],
        created_at=row["created_at"],
    )


def _tenant_from(row: Mapping[str, Any]) -> TenantRecord:
    return TenantRecord(
        id=row["id"],
        name=row["name"],
        policy=_policy_from(row),
        created_at=row["created_at"],
        weight=row.get("weight"),
    )


def _backend_from(row: Mapping[str, Any]) -> BackendRecord:
    spec = BackendSpec(
        name=row["name"],
        url=row["url"],
        slots=row["slots"],
        weight=row["weight"],
        state=BackendState(row["state"]),
    )
    return BackendRecord(
        id=row["id"], spec=spec, created_at=row["created_at"], updated_at=row["updated_at"]
    )


def _check_policy(policy: PolicySettings | Mapping[str, object]) -> None:
    items = (
        policy.items()
        if isinstance(policy, Mapping)
        else ((c, getattr(policy, c)) for c in POLICY_COLUMNS)
    )
    for column, value in items:
        check_policy_value(column, value)


#: A pooled connection that a Postgres restart (or a network blip) closed: the
#: query never ran. asyncpg finds out only when a query uses it.
_STALE_CONNECTION = (asyncpg.ConnectionDoesNotExistError, ConnectionResetError)


class Store:
    """Queries on one asyncpg pool.

    The reads on the request path (key lookup, ledger totals, revocations,
    the fleet's backends) are tried once more on a stale pooled connection:
    after Postgres comes back, the first request that draws a connection the
    restart closed must not be refused (issue 13). Writes are never retried
    here (the audit writer has its own spool).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        try:
            return await self.pool.fetchrow(query, *args)
        except _STALE_CONNECTION:
            return await self.pool.fetchrow(query, *args)

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        try:
            return list(await self.pool.fetch(query, *args))
        except _STALE_CONNECTION:
            return list(await self.pool.fetch(query, *args))

    # tenants -----------------------------------------------------------------

    async def create_tenant(
        self, name: str, policy: PolicySettings, weight: int | None = None
    ) -> TenantRecord:
        check_name("tenant", name)
        _check_policy(policy)
        if weight is not None:
            check_weight(weight)
        columns = ", ".join(POLICY_COLUMNS)
        params = ", ".join(f"${i + 3}" for i in range(len(POLICY_COLUMNS)))
        values = [getattr(policy, c) for c in POLICY_COLUMNS]
        values[POLICY_COLUMNS.index("models")] = (
            None if policy.models is None else list(policy.models)
        )
        try:
            row = await self.pool.fetchrow(
                f"INSERT INTO tenant (name, weight, {columns}) VALUES ($1, $2, {params})"  # noqa: S608 (column names are ours)
                " RETURNING *",
                name,
                weight,
                *values,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"tenant {name!r} already exists") from None
        return _tenant_from(_one(row))

    async def get_tenant(self, name: str) -> TenantRecord:
        row = await self.pool.fetchrow("SELECT * FROM tenant WHERE name = $1", name)
        if row is None:
            raise NotFound(f"unknown tenant {name!r}")
        return _tenant_from(row)

    async def update_tenant_policy(self, name: str, changes: Mapping[str, object]) -> TenantRecord:
        tenant = await self.get_tenant(name)
        _check_policy(changes)
        row = await self._update_policy("tenant", "id", tenant.id, changes)
        return _tenant_from(row)

    async def set_tenant_weight(self, name: str, weight: int | None) -> TenantRecord:
        """The tenant's share in the backend queues (``None``: back to the default, 1)."""
        if weight is not None:
            check_weight(weight)
        row = await self.pool.fetchrow(
            "UPDATE tenant SET weight = $2 WHERE name = $1 RETURNING *", name, weight
        )
        if row is None:
            raise NotFound(f"unknown tenant {name!r}")
        return _tenant_from(row)

    # backends ----------------------------------------------------------------

    async def add_backend(self, spec: BackendSpec) -> BackendRecord:
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO backend (name, url, slots, weight, state)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                spec.name,
                spec.url,
                spec.slots,
                spec.weight,
                spec.state.value,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"backend {spec.name!r} already exists") from None
        return _backend_from(_one(row))

    async def list_backends(self) -> list[BackendRecord]:
        rows = await self._fetch("SELECT * FROM backend ORDER BY name")
        return [_backend_from(r) for r in rows]

    async def backend_specs(self) -> list[BackendSpec]:
        """What the proxies route to (the backend directory's loader)."""
        return [r.spec for r in await self.list_backends()]

    async def set_backend_state(self, name: str, state: BackendState) -> BackendRecord:
        """Drain or enable (idempotent: the same state again changes nothing)."""
        row = await self.pool.fetchrow(
            "UPDATE backend SET state = $2, updated_at = now() WHERE name = $1 RETURNING *",
            name,
            state.value,
        )
        if row is None:
            raise NotFound(f"unknown backend {name!r}")
        return _backend_from(row)

    async def remove_backend(self, name: str) -> BackendRecord:
        row = await self.pool.fetchrow("DELETE FROM backend WHERE name = $1 RETURNING *", name)
        if row is None:
            raise NotFound(f"unknown backend {name!r}")
        return _backend_from(row)

    # keys --------------------------------------------------------------------

    async def create_key(
        self,
        *,
        tenant_name: str,
        name: str,
        prefix: str,
        secret_hash: str,
        policy: PolicySettings,
        expires_at: datetime | None,
        log_prompts: bool,
        prompt_ttl_days: int | None,
        secret_fingerprint: str | None = None,
    ) -> KeyRecord:
        """Store a new key; ``secret_fingerprint`` when the caller holds the server secret."""
        check_name("key", name)
        _check_policy(policy)
        tenant = await self.get_tenant(tenant_name)
        columns = ", ".join(POLICY_COLUMNS)
        params = ", ".join(f"${i + 9}" for i in range(len(POLICY_COLUMNS)))
        values = [getattr(policy, c) for c in POLICY_COLUMNS]
        values[POLICY_COLUMNS.index("models")] = (
            None if policy.models is None else list(policy.models)
        )
        try:
            await self.pool.execute(
                "INSERT INTO api_key (tenant, name, prefix, secret_hash, expires_at, log_prompts,"  # noqa: S608 (column names are ours)
                f" prompt_ttl_days, secret_fingerprint, {columns})"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {params})",
                tenant.id,
                name,
                prefix,
                secret_hash,
                expires_at,
                log_prompts,
                prompt_ttl_days,
                secret_fingerprint,
                *values,
            )
        except asyncpg.UniqueViolationError as exc:
            if "prefix" in str(exc.constraint_name or ""):
                raise Conflict("key prefix collision; try again") from None
            raise Conflict(f"tenant {tenant_name!r} already has a key named {name!r}") from None
        return await self.get_key(prefix)

    async def get_key(self, prefix: str) -> KeyRecord:
        row = await self.pool.fetchrow(_KEY_SELECT + " WHERE k.prefix = $1", prefix)
        if row is None:
            raise NotFound(f"unknown key prefix {prefix!r}")
        return _key_from(row)

    async def list_keys(self, tenant_name: str) -> list[KeyRecord]:
        tenant = await self.get_tenant(tenant_name)
        rows = await self.pool.fetch(_KEY_SELECT + " WHERE k.tenant = $1 ORDER BY k.id", tenant.id)
        return [_key_from(r) for r in rows]

    async def find_key_for_auth(self, prefix: str) -> AuthKeyRecord | None:
        """The key, its hashes and its tenant in one query; ``None`` if unknown."""
        row = await self._fetchrow(
            "SELECT row_to_json(k.*)::jsonb AS k, row_to_json(t.*)::jsonb AS t"
            " FROM api_key k JOIN tenant t ON t.id = k.tenant WHERE k.prefix = $1",
            prefix,
        )
        if row is None:
            return None
        k, t = dict(row["k"]), dict(row["t"])
        for name in ("expires_at", "revoked_at", "previous_valid_until", "created_at"):
            k[name] = datetime.fromisoformat(k[name]) if k[name] else None
        t["created_at"] = datetime.fromisoformat(t["created_at"])
        k["tenant_name"] = t["name"]
        return AuthKeyRecord(
            key=_key_from(k),
            tenant=_tenant_from(t),
            secret_hash=k["secret_hash"],
            previous_hash=k["previous_hash"],
            secret_fingerprint=k.get("secret_fingerprint"),
            previous_fingerprint=k.get("previous_fingerprint"),
        )

    async def revoke_key(self, prefix: str) -> KeyRecord:
        """Revoke now (idempotent: an already revoked key keeps its first time)."""
        await self.get_key(prefix)  # NotFound for an unknown prefix
        await self.pool.execute(
            "UPDATE api_key SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
            prefix,
        )
        return await self.get_key(prefix)

    async def rotate_key(
        self,
        prefix: str,
        new_hash: str,
        grace_seconds: int,
        new_fingerprint: str | None = None,
    ) -> KeyRecord:
        """Replace the secret; the old one stays valid ``grace_seconds`` (0 = not at all).

        The old secret's fingerprint moves along with its hash; the new one's is
        ``new_fingerprint`` (``None``: stored by the auth service on first use).
        """
        if grace_seconds < 0:
            raise InvalidInput("grace-seconds must not be negative")
        if grace_seconds > MAX_GRACE_SECONDS:
            raise InvalidInput(f"grace-seconds must be at most {MAX_GRACE_SECONDS} (one year)")
        key = await self.get_key(prefix)
        if key.revoked_at is not None:
            raise InvalidInput(f"key {prefix} is revoked; create a new key instead")
        await self.pool.execute(
            "UPDATE api_key SET previous_hash = CASE WHEN $3 > 0 THEN secret_hash END,"
            " previous_fingerprint = CASE WHEN $3 > 0 THEN secret_fingerprint END,"
            " previous_valid_until = CASE WHEN $3 > 0 THEN now() + make_interval(secs => $3) END,"
            " secret_hash = $2, secret_fingerprint = $4 WHERE prefix = $1",
            prefix,
            new_hash,
            float(grace_seconds),
            new_fingerprint,
        )
        return await self.get_key(prefix)

    async def update_key_hash(
        self, key_id: int, old_hash: str, new_hash: str, fingerprint: str | None = None
    ) -> None:
        """Store a rehash (``needs_rehash``) unless the hash changed meanwhile.

        The hash change clears the fingerprint (trigger, migration m0006); the
        second statement stores ``fingerprint`` again for the new hash.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE api_key SET secret_hash = $3 WHERE id = $1 AND secret_hash = $2",
                key_id,
                old_hash,
                new_hash,
            )
            if fingerprint is not None:
                await conn.execute(
                    "UPDATE api_key SET secret_fingerprint = $3 WHERE id = $1 AND secret_hash = $2",
                    key_id,
                    new_hash,
                    fingerprint,
                )

    async def set_key_fingerprint(
        self, key_id: int, *, previous: bool, verified_hash: str, fingerprint: str
    ) -> bool:
        """Store the fingerprint of the secret Argon2 just verified against ``verified_hash``.

        Only while that hash is still the key's (current or, with ``previous``,
        the one in its rotation grace): a rotation meanwhile wins. Returns
        whether a row changed.
        """
        column, hash_column = (
            ("previous_fingerprint", "previous_hash")
            if previous
            else ("secret_fingerprint", "secret_hash")
        )
        status: str = await self.pool.execute(
            f"UPDATE api_key SET {column} = $3 WHERE id = $1 AND {hash_column} = $2"  # noqa: S608 (names are ours)
            f" AND {column} IS DISTINCT FROM $3",
            key_id,
            verified_hash,
            fingerprint,
        )
        return status.rsplit(maxsplit=1)[-1] != "0"

    async def update_key_policy(self, prefix: str, changes: Mapping[str, object]) -> KeyRecord:
        key = await self.get_key(prefix)
        _check_policy(changes)
        await self._update_policy("api_key", "id", key.id, changes)
        return await self.get_key(prefix)

    async def _update_policy(
        self, table: str, id_column: str, row_id: int, changes: Mapping[str, object]
    ) -> Mapping[str, Any]:
        unknown = set(changes) - set(POLICY_COLUMNS)
        if unknown:
            raise InvalidInput(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if not changes:
            raise InvalidInput("nothing to change: give at least one limit, budget or model option")
        names = list(changes)
        values = [list(v) if isinstance(v, tuple) else v for v in (changes[n] for n in names)]
        assignments = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(names))
        row = await self.pool.fetchrow(
            f"UPDATE {table} SET {assignments} WHERE {id_column} = $1 RETURNING *",  # noqa: S608 (names checked above)
            row_id,
            *values,
        )
        return _one(row)

    # ledger ------------------------------------------------------------------

    async def usage(
        self, tenant_name: str, prefix: str | None = None, since: datetime | None = None
    ) -> UsageTotals:
        tenant = await self.get_tenant(tenant_name)
        key_id = None
        if prefix is not None:
            key = await self.get_key(prefix)
            if key.tenant_id != tenant.id:
                raise NotFound(f"unknown key prefix {prefix!r} for tenant {tenant_name!r}")
            key_id = key.id
        row = await self.pool.fetchrow(
            "SELECT count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS p,"
            " coalesce(sum(completion_tokens), 0) AS c FROM usage_log"
            " WHERE tenant_id = $1 AND ($2::int IS NULL OR key_id = $2)"
            " AND ($3::timestamptz IS NULL OR ts >= $3)",
            tenant.id,
            key_id,
            since,
        )
        row = _one(row)
        return UsageTotals(
            requests=row["requests"],
            prompt_tokens=int(row["p"]),
            completion_tokens=int(row["c"]),
            total_tokens=int(row["p"]) + int(row["c"]),
        )

    async def audit(self, tenant_name: str, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            raise InvalidInput("limit must be positive")
        tenant = await self.get_tenant(tenant_name)
        rows = await self.pool.fetch(
            "SELECT request_id, ts, key_prefix, route, model, status, prompt_tokens,"
            " completion_tokens, ttfb_ms, duration_ms, streamed, client_disconnected, estimated,"
            " revoked"
            " FROM usage_log WHERE tenant_id = $1 ORDER BY ts DESC, id DESC LIMIT $2",
            tenant.id,
            limit,
        )
        return [dict(r) for r in rows]

    async def revoked_keys(self, key_ids: list[int]) -> set[int]:
        """Those of ``key_ids`` that are revoked (for ending their running requests)."""
        rows = await self._fetch(
            "SELECT id FROM api_key WHERE id = ANY($1::int[]) AND revoked_at IS NOT NULL",
            key_ids,
        )
        return {int(r["id"]) for r in rows}

    async def ledger_totals(
        self, *, tenant_id: int, key_id: int | None, day_start: datetime, month_start: datetime
    ) -> LedgerTotals:
        """Tokens spent today, this month and ever, for a key (or the whole tenant)."""
        row = await self._fetchrow(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens)"
            "   FILTER (WHERE ts >= $3), 0) AS d,"
            " coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE ts >= $4), 0) AS m,"
            " coalesce(sum(prompt_tokens + completion_tokens), 0) AS t"
            " FROM usage_log WHERE tenant_id = $1 AND ($2::int IS NULL OR key_id = $2)",
            tenant_id,
            key_id,
            day_start,
            month_start,
        )
        row = _one(row)
        return LedgerTotals(daily=int(row["d"]), monthly=int(row["m"]), total=int(row["t"]))

    async def purge_prompts(self, now: datetime) -> int:
        """Delete prompt logs past their expiry; return how many."""
        status: str = await self.pool.execute("DELETE FROM prompt_log WHERE expires_at <= $1", now)
        return int(status.rsplit(maxsplit=1)[-1])


MAX_GRACE_SECONDS = 366 * 86_400
MAX_DAYS = 36_500  # a hundred years: beyond that, "never" is the honest answer


def expiry_from_days(now: datetime, days: int | None) -> datetime | None:
    """``now + days`` (``None`` for no expiry); ``days`` must be 1..36500."""
    if days is None:
        return None
    if days <= 0:
        raise InvalidInput("expires-in-days must be positive")
    if days > MAX_DAYS:
        raise InvalidInput(f"expires-in-days must be at most {MAX_DAYS}")
    return now + timedelta(days=days)


def models_list(raw: str | None) -> tuple[str, ...] | None:
    """Parse ``a,b`` into a tuple (``None`` passes through)."""
    if raw is None:
        return None
    items = tuple(m.strip() for m in raw.split(",") if m.strip())
    if not items:
        raise InvalidInput("--models needs at least one model name")
    return items


__all__ += ["MAX_DAYS", "MAX_GRACE_SECONDS", "expiry_from_days", "models_list"]
