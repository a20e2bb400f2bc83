"""The signed identity token: round trip, tamper detection, expiry."""

from __future__ import annotations

import base64

import msgspec
import pytest

from neuronetz_gateway.domain.identity import (
    Allowance,
    Identity,
    IdentityError,
    Limits,
    OptionCaps,
    sign_identity,
    verify_identity,
)

SECRET = b"k" * 40
NOW = 1_800_000_000_000


def _identity(**changes: object) -> Identity:
    base = Identity(
        request_id="r1",
        tenant_id=3,
        tenant_name="acme",
        key_id=7,
        key_prefix="nz_abc12345",
        route="chat",
        expires_at_ms=NOW + 30_000,
        models=["llama3.2:latest"],
        caps=OptionCaps(max_num_ctx=4096),
        key_limits=Limits(rpm=10),
        tenant_limits=Limits(rpm=100, daily_tokens=1000),
        lease_id="lease-1",
        allowance=Allowance(limit_requests=10, remaining_requests=9),
    )
    return msgspec.structs.replace(base, **changes)


def test_round_trip() -> None:
    identity = _identity()
    assert verify_identity(sign_identity(identity, SECRET), SECRET, NOW) == identity


@pytest.mark.parametrize("token", [None, "", "v1", "v1..", "v2.e30.AAAA", "garbage", "v1.%%%.%%%"])
def test_malformed_tokens_fail(token: str | None) -> None:
    with pytest.raises(IdentityError):
        verify_identity(token, SECRET, NOW)


def test_other_secret_fails() -> None:
    token = sign_identity(_identity(), SECRET)
    with pytest.raises(IdentityError):
        verify_identity(token, b"x" * 40, NOW)


def test_expired_fails() -> None:
    token = sign_identity(_identity(), SECRET)
    with pytest.raises(IdentityError, match="expired"):
        verify_identity(token, SECRET, NOW + 30_001)


@pytest.mark.parametrize(
    "field",
    ["tenant_id", "key_id", "route", "models", "lease_id", "allowance", "key_limits", "caps"],
)
def test_changing_any_field_breaks_the_signature(field: str) -> None:
    token = sign_identity(_identity(), SECRET)
    _, payload, signature = token.split(".")
    data = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data[field] = {
        "tenant_id": 4,
        "key_id": 8,
        "route": "generate",
        "models": None,
        "lease_id": "other",
        "allowance": {},
        "key_limits": {},
        "caps": {},
    }[field]
    forged = base64.urlsafe_b64encode(msgspec.json.encode(data)).rstrip(b"=").decode()
    with pytest.raises(IdentityError):
        verify_identity(f"v1.{forged}.{signature}", SECRET, NOW)


def test_changing_any_character_breaks_it() -> None:
    token = sign_identity(_identity(), SECRET)
    for i in range(len(token)):
        for replacement in "ABQgw-_.":
            if replacement == token[i]:
                continue
            changed = token[:i] + replacement + token[i + 1 :]
            with pytest.raises(IdentityError):
                verify_identity(changed, SECRET, NOW)


def test_the_previous_secret_is_accepted_during_a_rotation() -> None:
    old, new = b"o" * 40, b"n" * 40
    by_old, by_new = sign_identity(_identity(), old), sign_identity(_identity(), new)
    # a proxy that took the new secret first still accepts what old auths sign
    assert verify_identity(by_old, new, NOW, previous_secret=old) == _identity()
    assert verify_identity(by_new, new, NOW, previous_secret=old) == _identity()
    with pytest.raises(IdentityError, match="bad signature"):
        verify_identity(by_old, new, NOW)  # once the old one is dropped, it is refused
    with pytest.raises(IdentityError, match="bad signature"):
        verify_identity(sign_identity(_identity(), b"x" * 40), new, NOW, previous_secret=old)
    tampered = by_old.replace(by_old.split(".")[1], by_new.split(".")[1][:-2] + "AA")
    with pytest.raises(IdentityError):
        verify_identity(tampered, new, NOW, previous_secret=old)
    with pytest.raises(IdentityError, match="expired"):
        verify_identity(by_old, new, NOW + 30_001, previous_secret=old)
