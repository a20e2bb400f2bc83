"""Policy inheritance (tenant → key) and Ollama-style model canonicalisation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from neuronetz_gateway.domain.errors import InvalidInput
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.models import canonical_model, effective_models
from neuronetz_gateway.domain.policy import (
    PolicySettings,
    check_name,
    check_policy_value,
    key_state_refusal,
    merge_models,
    resolve_policy,
)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("LLaMA3.2", "llama3.2:latest"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest"),
        ("qwen2.5:0.5b", "qwen2.5:0.5b"),
        ("someone/model:q4", "someone/model:q4"),
        ("hf.co/org/model:Q4_K_M", "hf.co/org/model:q4_k_m"),
        ("", ""),
        ("bad name", ""),
        ("a//b", ""),
    ],
)
def test_canonical_model(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical


def test_effective_set_is_allowed_intersect_discovered() -> None:
    discovered = ["llama3.2:latest", "qwen2.5:0.5b"]
    assert effective_models(["llama3.2", "mistral"], discovered) == {"llama3.2:latest"}
    assert effective_models(None, discovered) == {"llama3.2:latest", "qwen2.5:0.5b"}
    assert effective_models(None, []) == frozenset()  # failed discovery denies all


def test_key_narrows_tenant_models() -> None:
    assert merge_models(None, None) is None
    assert merge_models(("a", "b"), None) == ("a:latest", "b:latest")
    assert merge_models(None, ("a",)) == ("a:latest",)
    assert merge_models(("a", "b"), ("b", "c")) == ("b:latest",)


def test_key_overrides_and_inherits_limits() -> None:
    tenant = PolicySettings(rpm=100, tpm=1000, daily_tokens=5000, max_num_ctx=8192)
    key = PolicySettings(rpm=10, monthly_tokens=50, allow_keep_alive_override=True)
    resolved = resolve_policy(tenant, key)
    assert resolved.tenant_limits == Limits(rpm=100, tpm=1000, daily_tokens=5000)
    assert resolved.key_limits == Limits(rpm=10, tpm=1000, daily_tokens=5000, monthly_tokens=50)
    assert resolved.caps.max_num_ctx == 8192
    assert resolved.caps.allow_keep_alive_override is True
    assert resolved.models is None


def test_clearing_an_override_returns_to_inherit() -> None:
    tenant = PolicySettings(rpm=100)
    key = PolicySettings(rpm=10).updated({"rpm": None})
    assert resolve_policy(tenant, key).key_limits.rpm == 100
    with pytest.raises(ValueError, match="unknown"):
        PolicySettings().updated({"nope": 1})


def test_key_state() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert key_state_refusal(now, revoked_at=None, expires_at=None) is None
    assert key_state_refusal(now, revoked_at=now, expires_at=None) == "revoked"
    assert key_state_refusal(now, revoked_at=None, expires_at=now) == "expired"
    later = now + timedelta(seconds=1)
    assert key_state_refusal(now, revoked_at=later, expires_at=later) is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("rpm", -1, "must not be negative"),
        ("rpm", 0, "at least 1"),
        ("concurrency", 0, "at least 1"),
        ("rpm", 2**31, "at most 2147483647"),
        ("daily_tokens", 2**63, "at most"),
    ],
)
def test_policy_values_out_of_range(name: str, value: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_policy_value(name, value)


def test_policy_values_in_range() -> None:
    check_policy_value("daily_tokens", 0)  # a zero budget is a real (if harsh) policy
    check_policy_value("tpm", 2**40)
    check_policy_value("rpm", 2**31 - 1)
    check_policy_value("allow_keep_alive_override", True)
    check_policy_value("models", ("a",))


@pytest.mark.parametrize(
    ("name", "message"),
    [(" ", "empty"), ("x" * 101, "at most 100"), ("a\x00b", "control"), ("tab\there", "control")],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_name("tenant", name)


def test_good_names() -> None:
    check_name("tenant", "Acme GmbH, Zürich")
    check_name("key", "x" * 100)


def test_canonical_model_remembers_short_names_only() -> None:
    from neuronetz_gateway.domain import models

    info = models._canonical_cached.cache_info
    assert info().maxsize == 1024  # bounded
    models.canonical_model("Llama3.2")
    hits = info().hits
    assert models.canonical_model("Llama3.2") == "llama3.2:latest"
    assert info().hits == hits + 1
    long_name = "a" * 300
    assert models.canonical_model(long_name) == long_name + ":latest"
    assert models.canonical_model(long_name) == long_name + ":latest"
    assert info().hits == hits + 1  # the long one was not cached
