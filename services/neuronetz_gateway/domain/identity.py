"""The signed identity the auth service hands to the proxy (through Caddy).

Token: ``v1.<base64url(json payload)>.<base64url(hmac-sha256(secret, "v1." + payload))>``
carried in one header, :data:`IDENTITY_HEADER`. The proxy trusts nothing
that does not verify here, so a client-sent copy, a Caddy placeholder, a
stale or tampered token all fail the same way.
"""

from __future__ import annotations

import base64
import binascii
import hmac

import msgspec

from neuronetz_gateway.domain.key_state import KeyState
from neuronetz_gateway.domain.keyed_mac import hmac_sha256

__all__ = [
    "IDENTITY_HEADER",
    "Allowance",
    "Identity",
    "IdentityError",
    "Limits",
    "OptionCaps",
    "sign_identity",
    "verify_identity",
]

IDENTITY_HEADER = "x-nz-identity"
_VERSION = b"v1"


class IdentityError(ValueError):
    """The identity token is missing, malformed, forged or expired."""


class Limits(msgspec.Struct, frozen=True, omit_defaults=True):
    """Effective limits at one level (key or tenant); ``None`` = unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    total_tokens: int | None = None


class OptionCaps(msgspec.Struct, frozen=True, omit_defaults=True):
    """Caps on Ollama options that cost shared GPU; ``None`` = uncapped."""

    max_num_ctx: int | None = None
    max_num_predict: int | None = None
    allow_keep_alive_override: bool = False


class Allowance(msgspec.Struct, frozen=True, omit_defaults=True):
    """What was left at decision time, for the ``x-ratelimit-*`` response headers."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    remaining_daily_tokens: int | None = None
    remaining_monthly_tokens: int | None = None
    remaining_total_tokens: int | None = None
    # ms until the requests / tokens remaining next go up (x-ratelimit-reset-*)
    reset_requests_ms: int | None = None
    reset_tokens_ms: int | None = None


class Identity(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who is calling and under which policy, as decided by the auth service."""

    request_id: str
    tenant_id: int
    tenant_name: str
    key_id: int
    key_prefix: str
    route: str
    expires_at_ms: int
    models: list[str] | None = None  # canonical names; None = all models
    caps: OptionCaps = OptionCaps()
    key_limits: Limits = Limits()
    tenant_limits: Limits = Limits()
    lease_id: str | None = None
    allowance: Allowance = Allowance()
    log_prompts: bool = False
    prompt_ttl_days: int | None = None
    key_state: KeyState | None = None  # the key-info routes only: what is left, when
    traceparent: str | None = None  # W3C trace context of auth's span (tracing on only)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Identity)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    decoded = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    # Only the canonical spelling verifies: otherwise the unused low bits of
    # the last character could be flipped without changing the bytes.
    if _b64(decoded) != data:
        raise IdentityError("malformed identity")
    return decoded


def _mac(secret: bytes, signed: bytes) -> bytes:
    return hmac_sha256(secret, signed).digest()


def sign_identity(identity: Identity, secret: bytes) -> str:
    """Serialise and sign; the result goes in the :data:`IDENTITY_HEADER` header."""
    signed = _VERSION + b"." + _b64(_encoder.encode(identity))
    return (signed + b"." + _b64(_mac(secret, signed))).decode()


def verify_identity(
    token: str | None, secret: bytes, now_ms: int, *, previous_secret: bytes | None = None
) -> Identity:
    """Verify signature and expiry; raise :class:`IdentityError` on anything else.

    ``previous_secret`` (``NZ_GATEWAY_SECRET_PREVIOUS``) is accepted too, so
    the proxies can take a new secret before the auth replicas sign with it:
    a rotation under traffic refuses nothing (docs/OPERATIONS.md).
    """
    if not token:
        raise IdentityError("missing identity")
    raw = token.encode()
    signed, _, signature = raw.rpartition(b".")
    if not signed.startswith(_VERSION + b"."):
        raise IdentityError("malformed identity")
    try:
        presented = _unb64(signature)
        if not hmac.compare_digest(_mac(secret, signed), presented) and (
            previous_secret is None
            or not hmac.compare_digest(_mac(previous_secret, signed), presented)
        ):
            raise IdentityError("bad signature")
        identity = _decoder.decode(_unb64(signed[len(_VERSION) + 1 :]))
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        if isinstance(exc, IdentityError):
            raise
        raise IdentityError("malformed identity") from None
    if identity.expires_at_ms < now_ms:
        raise IdentityError("identity expired")
    return identity
