"""Settings: typed, validated, naming the bad variable, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronetz_gateway.settings import (
    SettingsError,
    check_spool_dir,
    default_spool_dir,
    load_database_url,
    load_settings,
    secret_warnings,
)

GOOD = {"NZ_GATEWAY_SECRET": "s" * 40}


def test_defaults_and_types() -> None:
    settings = load_settings(
        {**GOOD, "NZ_LEASE_TTL_SECONDS": "15", "NZ_KEY_CACHE_TTL_SECONDS": "2.5"}
    )
    assert settings.lease_ttl_seconds == 15
    assert settings.key_cache_ttl_seconds == 2.5
    assert settings.queue_timeout_seconds == 30.0
    assert load_settings({**GOOD, "NZ_QUEUE_TIMEOUT_SECONDS": "2.5"}).queue_timeout_seconds == 2.5
    assert settings.queue_ping_seconds == 3.0
    assert load_settings({**GOOD, "NZ_QUEUE_PING_SECONDS": "0.5"}).queue_ping_seconds == 0.5
    assert settings.ollama_url == "http://127.0.0.1:11434"
    assert (settings.keep_alive_min_seconds, settings.keep_alive_max_seconds) == (60, 86400)
    assert settings.ollama_slots is None  # NZ_OLLAMA_URL without slot admission
    assert settings.fallback_slots == 4
    assert load_settings({**GOOD, "NZ_OLLAMA_SLOTS": "16"}).fallback_slots == 16


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "NZ_GATEWAY_SECRET"),
        ({"NZ_GATEWAY_SECRET": "   "}, "NZ_GATEWAY_SECRET"),
        ({**GOOD, "NZ_DATABASE_URL": "mysql://x"}, "NZ_DATABASE_URL"),
        ({**GOOD, "NZ_REDIS_URL": "nope"}, "NZ_REDIS_URL"),
        ({**GOOD, "NZ_OLLAMA_URL": "ftp://x"}, "NZ_OLLAMA_URL"),
        ({**GOOD, "NZ_LEASE_TTL_SECONDS": "ten"}, "NZ_LEASE_TTL_SECONDS"),
        ({**GOOD, "NZ_LEASE_TTL_SECONDS": "-1"}, "NZ_LEASE_TTL_SECONDS"),
        ({**GOOD, "NZ_QUEUE_TIMEOUT_SECONDS": "0"}, "NZ_QUEUE_TIMEOUT_SECONDS"),
        ({**GOOD, "NZ_LOG_LEVEL": "loud"}, "NZ_LOG_LEVEL"),
        ({**GOOD, "NZ_KEEP_ALIVE_MIN_SECONDS": "0"}, "NZ_KEEP_ALIVE_MIN_SECONDS"),
        ({**GOOD, "NZ_OLLAMA_SLOTS": "0"}, "NZ_OLLAMA_SLOTS"),
        ({**GOOD, "NZ_OLLAMA_SLOTS": "5000"}, "NZ_OLLAMA_SLOTS"),
        ({**GOOD, "NZ_OLLAMA_SLOTS": "four"}, "NZ_OLLAMA_SLOTS"),
        (
            {**GOOD, "NZ_KEEP_ALIVE_MIN_SECONDS": "600", "NZ_KEEP_ALIVE_MAX_SECONDS": "60"},
            "NZ_KEEP_ALIVE_MIN_SECONDS",
        ),
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


def test_short_secret_works_with_a_warning() -> None:
    assert secret_warnings(load_settings({"NZ_GATEWAY_SECRET": "short"})) != []
    assert secret_warnings(load_settings(GOOD)) == []


def test_spool_dir_default_needs_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_spool_dir({"XDG_STATE_HOME": "/home/u/.state"}) == (
        "/home/u/.state/neuronetz-gateway/spool"
    )
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_spool_dir({}) == "/var/lib/neuronetz-gateway/spool"


def test_spool_dir_is_checked_and_named(tmp_path: Path) -> None:
    check_spool_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SettingsError, match="NZ_AUDIT_SPOOL_DIR"):
        check_spool_dir(str(blocker / "spool"))


def test_the_previous_secret_is_optional_hidden_and_checked_for_sense() -> None:
    assert load_settings(GOOD).previous_secret() is None
    rotating = load_settings({**GOOD, "NZ_GATEWAY_SECRET_PREVIOUS": "p" * 40})
    assert rotating.previous_secret() == b"p" * 40
    assert "p" * 40 not in repr(rotating)
    assert secret_warnings(rotating) == []
    same = load_settings({**GOOD, "NZ_GATEWAY_SECRET_PREVIOUS": GOOD["NZ_GATEWAY_SECRET"]})
    assert any("nothing is being rotated" in w for w in secret_warnings(same))
