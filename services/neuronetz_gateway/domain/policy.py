"""Tenant and key policy, and how a key's settings resolve against its tenant's. Pure.

Tenant ``None`` = unlimited / all models; key ``None`` = inherit. Both levels
are enforced at request time, so the key level resolves to "its own
override, else the tenant's value", and the model set to key ∩ tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime

from neuronetz_gateway.domain.errors import InvalidInput
from neuronetz_gateway.domain.identity import Limits, OptionCaps
from neuronetz_gateway.domain.models import canonical_model

__all__ = [
    "LIMIT_FIELDS",
    "NAME_MAX_LENGTH",
    "POLICY_FIELDS",
    "PolicySettings",
    "ResolvedPolicy",
    "check_name",
    "check_policy_value",
    "merge_models",
    "resolve_policy",
]

LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens", "total_tokens")
POLICY_FIELDS = (
    *LIMIT_FIELDS,
    "models",
    "max_num_ctx",
    "max_num_predict",
    "allow_keep_alive_override",
)


_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
# Rates of 0 would refuse everything forever: revoke the key instead.
_AT_LEAST_ONE = frozenset({"rpm", "tpm", "concurrency", "max_num_ctx", "max_num_predict"})
# The columns that are 32-bit in Postgres; the others are 64-bit.
_INT32_FIELDS = frozenset({"rpm", "concurrency", "max_num_ctx", "max_num_predict"})
NAME_MAX_LENGTH = 100


def check_policy_value(name: str, value: object) -> None:
    """Raise :class:`InvalidInput` (naming the option) for a value out of range."""
    if not isinstance(value, int) or isinstance(value, bool):
        return
    option = "--" + name.replace("_", "-")
    if value < 0:
        raise InvalidInput(f"{option} must not be negative")
    if value == 0 and name in _AT_LEAST_ONE:
        raise InvalidInput(f"{option} must be at least 1 (to block a key, revoke it)")
    ceiling = _INT32_MAX if name in _INT32_FIELDS else _INT64_MAX
    if value > ceiling:
        raise InvalidInput(f"{option} must be at most {ceiling}")


def check_name(kind: str, name: str) -> None:
    """Tenant and key names: 1-100 printable characters."""
    if not name.strip():
        raise InvalidInput(f"{kind} name must not be empty")
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidInput(f"{kind} name must be at most {NAME_MAX_LENGTH} characters")
    if not name.isprintable():
        raise InvalidInput(f"{kind} name must not contain control characters")


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The settable columns shared by tenants and keys (``None`` = unset)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    total_tokens: int | None = None
    models: tuple[str, ...] | None = None
    max_num_ctx: int | None = None
    max_num_predict: int | None = None
    allow_keep_alive_override: bool | None = None

    def updated(self, changes: dict[str, object]) -> PolicySettings:
        """A copy with ``changes`` applied (``None`` clears a field)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        if "models" in changes and changes["models"] is not None:
            changes = {**changes, "models": tuple(changes["models"])}  # type: ignore[arg-type]
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """What the gateway enforces for one key: both levels' limits, models and caps."""

    key_limits: Limits
    tenant_limits: Limits
    models: tuple[str, ...] | None
    caps: OptionCaps


def merge_models(
    tenant_models: tuple[str, ...] | None, key_models: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """Key narrows tenant: ``None`` means all at that level."""
    tenant = None if tenant_models is None else {canonical_model(m) for m in tenant_models} - {""}
    key = None if key_models is None else {canonical_model(m) for m in key_models} - {""}
    if tenant is None and key is None:
        return None
    if tenant is None:
        return tuple(sorted(key or ()))
    if key is None:
        return tuple(sorted(tenant))
    return tuple(sorted(tenant & key))


def _pick(key_value: int | None, tenant_value: int | None) -> int | None:
    return tenant_value if key_value is None else key_value


def resolve_policy(tenant: PolicySettings, key: PolicySettings) -> ResolvedPolicy:
    """Resolve a key's effective policy against its tenant's."""
    tenant_limits = Limits(**{f: getattr(tenant, f) for f in LIMIT_FIELDS})
    key_limits = Limits(**{f: _pick(getattr(key, f), getattr(tenant, f)) for f in LIMIT_FIELDS})
    caps = OptionCaps(
        max_num_ctx=_pick(key.max_num_ctx, tenant.max_num_ctx),
        max_num_predict=_pick(key.max_num_predict, tenant.max_num_predict),
        allow_keep_alive_override=bool(
            tenant.allow_keep_alive_override
            if key.allow_keep_alive_override is None
            else key.allow_keep_alive_override
        ),
    )
    return ResolvedPolicy(
        key_limits=key_limits,
        tenant_limits=tenant_limits,
        models=merge_models(tenant.models, key.models),
        caps=caps,
    )


def key_state_refusal(
    now: datetime,
    *,
    revoked_at: datetime | None,
    expires_at: datetime | None,
) -> str | None:
    """Why a key may not be used now (``"revoked"``/``"expired"``), or ``None``."""
    if revoked_at is not None and revoked_at <= now:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return None


__all__ += ["key_state_refusal"]
