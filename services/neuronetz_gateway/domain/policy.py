"""Tenant and key policy, and how a key's settings resolve against its tenant's. Pure.

Tenant ``None`` = unlimited / all models; key ``None`` = inherit. Both levels
are enforced at request time, so the key level resolves to "its own
override, else the tenant's value", and the model set to key ∩ tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime

from neuronetz_gateway.domain.identity import Limits, OptionCaps
from neuronetz_gateway.domain.models import canonical_model

__all__ = [
    "LIMIT_FIELDS",
    "POLICY_FIELDS",
    "PolicySettings",
    "ResolvedPolicy",
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
