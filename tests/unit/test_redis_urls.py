"""Redis URL forms: the Sentinel URL and the settings that name Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronetz_gateway.domain.redis_urls import parse_sentinel_url
from neuronetz_gateway.settings import SettingsError, load_settings

GOOD = {"NZ_GATEWAY_SECRET": "s" * 40}


def test_a_sentinel_url_names_its_sentinels_master_and_database() -> None:
    target = parse_sentinel_url("redis+sentinel://10.0.0.1:26379,sentinel-b:26380/mymaster/3")
    assert target.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380))
    assert (target.master, target.db, target.tls) == ("mymaster", 3, False)
    assert target.username is None and target.password is None


def test_sentinel_url_defaults_credentials_and_tls() -> None:
    target = parse_sentinel_url("rediss+sentinel://app:p%40ss@s1,[::1]:26381/main")
    assert target.sentinels == (("s1", 26379), ("::1", 26381))
    assert (target.master, target.db, target.tls) == ("main", 0, True)
    assert (target.username, target.password) == ("app", "p@ss")


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1/0",
        "redis+sentinel://h:1",  # no master
        "redis+sentinel://h:1/m/x",  # db not a number
        "redis+sentinel://h:1/m/0/extra",
        "redis+sentinel://h:port/m",
        "redis+sentinel://:1/m",
    ],
)
def test_malformed_sentinel_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"sentinel"):
        parse_sentinel_url(url)


def test_settings_take_sentinel_and_tls_urls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    sentinel = load_settings({**GOOD, "NZ_REDIS_URL": "redis+sentinel://a:26379,b:26379/m/0"})
    assert sentinel.redis_url.startswith("redis+sentinel://")
    tls = load_settings(
        {**GOOD, "NZ_REDIS_URL": "rediss://redis.example:6380/0", "NZ_REDIS_CA_FILE": str(ca)}
    )
    assert tls.redis_ca_file == str(ca)
    assert load_settings(GOOD).redis_ca_file == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NZ_REDIS_URL": "redis+sentinel://a:26379"}, "NZ_REDIS_URL"),
        ({"NZ_REDIS_CA_FILE": "/nonexistent/ca.crt"}, "NZ_REDIS_CA_FILE"),
    ],
)
def test_bad_redis_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings({**GOOD, **env})
