"""Settings: typed, validated, naming the bad variable, secrets hidden."""

from __future__ import annotations

import pytest

from neuronetz_gateway.settings import SettingsError, load_database_url, load_settings

GOOD = {"NZ_GATEWAY_SECRET": "s" * 40}


def test_defaults_and_types() -> None:
    settings = load_settings(
        {**GOOD, "NZ_LEASE_TTL_SECONDS": "15", "NZ_KEY_CACHE_TTL_SECONDS": "2.5"}
    )
    assert settings.lease_ttl_seconds == 15
    assert settings.key_cache_ttl_seconds == 2.5
    assert settings.ollama_url == "http://127.0.0.1:11434"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "NZ_GATEWAY_SECRET"),
        ({**GOOD, "NZ_DATABASE_URL": "mysql://x"}, "NZ_DATABASE_URL"),
        ({**GOOD, "NZ_REDIS_URL": "nope"}, "NZ_REDIS_URL"),
        ({**GOOD, "NZ_OLLAMA_URL": "ftp://x"}, "NZ_OLLAMA_URL"),
        ({**GOOD, "NZ_LEASE_TTL_SECONDS": "ten"}, "NZ_LEASE_TTL_SECONDS"),
        ({**GOOD, "NZ_LEASE_TTL_SECONDS": "-1"}, "NZ_LEASE_TTL_SECONDS"),
        ({**GOOD, "NZ_LOG_LEVEL": "loud"}, "NZ_LOG_LEVEL"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_secret_never_in_repr() -> None:
    settings = load_settings({"NZ_GATEWAY_SECRET": "very-secret-value-" + "z" * 30})
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in str(settings.gateway_secret)
    assert settings.gateway_secret.get().startswith("very-secret-value")


def test_database_url_alone() -> None:
    assert load_database_url({"NZ_DATABASE_URL": "postgresql://u@h:1/d"}) == "postgresql://u@h:1/d"
    with pytest.raises(SettingsError, match="NZ_DATABASE_URL"):
        load_database_url({"NZ_DATABASE_URL": "http://x"})
