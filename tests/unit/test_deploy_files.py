"""The deployment files: what can be checked without a Docker engine.

Compose files parse and reference files that exist; nothing but Caddy
publishes a port; auth and proxy can be scaled; migrations run first; the
Dockerfile's commands are the ones the end-to-end tests run; and Caddy 2.6
(from PATH) validates and adapts the Caddyfile the way the design needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from neuronetz_gateway.devstack.caddyfile import PACKAGED_CADDYFILE, REPOSITORY_CADDYFILE
from neuronetz_gateway.proxy.asgi import DRAIN_BYTES
from neuronetz_gateway.settings import Settings
from tests.e2e.processes import service_argv
from tests.support.caddy import caddy_binaries

ROOT = Path(__file__).resolve().parents[2]
CADDYFILE = ROOT / "caddy" / "Caddyfile"
DOCKERFILE = ROOT / "images" / "Dockerfile"
PRIVATE_SERVICES = ("auth", "proxy", "postgres", "redis", "ollama")


def _compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict)
    return data


CADDIES = caddy_binaries()


def _caddy(version: str | None = None) -> str:
    """The Caddy of ``version`` (default: the oldest found, Debian's 2.6 in CI)."""
    if not CADDIES:
        pytest.fail("no caddy found: install Debian's (apt install caddy) and the dev group")
    return CADDIES[version] if version else next(iter(CADDIES.values()))


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("name", ["compose.dev.yml", "compose.prod.yml"])
def test_compose_files_reference_files_that_exist(name: str) -> None:
    compose = _compose(name)
    for service, spec in compose["services"].items():
        build = spec.get("build")
        if build is not None:
            context = ROOT / build["context"]
            assert context.is_dir(), (service, context)
            assert (context / build["dockerfile"]).is_file(), (service, build)
            if "target" in build:
                assert f" AS {build['target']}" in (context / build["dockerfile"]).read_text()
        for volume in spec.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (service, source)
            else:
                assert source in compose.get("volumes", {}), (service, source)
        assert spec.get("image") or build, service


@pytest.mark.parametrize("name", ["compose.dev.yml", "compose.prod.yml"])
def test_only_caddy_publishes_ports(name: str) -> None:
    services = _compose(name)["services"]
    for service in PRIVATE_SERVICES:
        assert "ports" not in services[service], service
    published = {s for s, spec in services.items() if spec.get("ports")}
    assert published == {"caddy"}


@pytest.mark.parametrize("name", ["compose.dev.yml", "compose.prod.yml"])
def test_auth_and_proxy_can_be_scaled_and_start_after_migrations(name: str) -> None:
    services = _compose(name)["services"]
    migrate = next(s for s, spec in services.items() if "migrate" in spec.get("command", []))
    assert services[migrate]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in ("auth", "proxy"):
        spec = services[service]
        assert "container_name" not in spec
        assert spec["depends_on"][migrate]["condition"] == "service_completed_successfully"
    caddy_env = services["caddy"]["environment"]
    # Caddy must see every replica, not the first A record of a name.
    assert caddy_env["NZ_UPSTREAM_DISCOVERY"] == "dns"
    assert (caddy_env["NZ_AUTH_DNS_NAME"], caddy_env["NZ_PROXY_DNS_NAME"]) == ("auth", "proxy")


def test_production_keeps_private_services_on_an_internal_network() -> None:
    compose = _compose("compose.prod.yml")
    internal = {name for name, net in compose["networks"].items() if (net or {}).get("internal")}
    assert internal
    for service in PRIVATE_SERVICES:
        assert set(compose["services"][service]["networks"]) <= internal, service
    caddy = compose["services"]["caddy"]
    assert set(caddy["networks"]) - internal, "Caddy needs a network with egress for ACME"
    assert any(str(v).endswith(":/data") for v in caddy["volumes"]), "certificates persisted"
    assert caddy["environment"]["NZ_SITE_ADDRESS"].endswith("api.neuronetz.ai}")


# ---------------------------------------------------------------- Dockerfile


def _stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instruction lines (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def _cmd(stage: list[str]) -> list[str]:
    cmds = [line for line in stage if line.startswith("CMD ")]
    assert cmds, stage
    value = json.loads(cmds[-1].removeprefix("CMD "))
    assert isinstance(value, list)
    return [str(v) for v in value]


@pytest.mark.parametrize(("target", "port"), [("auth", 8081), ("proxy", 8082)])
def test_dockerfile_runs_the_command_the_e2e_tests_run(target: str, port: int) -> None:
    stages = _stages(DOCKERFILE.read_text())
    cmd = _cmd(stages[target])
    assert cmd == ["neuronetz-gateway", *service_argv(target, "0.0.0.0", port)]
    assert "--workers" not in cmd, "one worker per container; scale containers instead"
    assert any(
        line.startswith("HEALTHCHECK") and f":{port}/healthz" in line for line in stages[target]
    )
    assert any(line.startswith(f"EXPOSE {port}") for line in stages[target])


def test_dockerfile_runs_as_a_non_root_user() -> None:
    stages = _stages(DOCKERFILE.read_text())
    users = [line.split()[1] for line in stages["gateway"] if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    for target in ("auth", "proxy"):
        assert stages[target][0].startswith("FROM gateway AS"), "services inherit the user"
        assert not any(line.startswith("USER ") for line in stages[target])


# ---------------------------------------------------------------- Caddyfile


def test_packaged_caddyfile_is_the_repository_one() -> None:
    assert REPOSITORY_CADDYFILE == CADDYFILE
    assert PACKAGED_CADDYFILE.read_bytes() == CADDYFILE.read_bytes(), (
        "copy caddy/Caddyfile to services/neuronetz_gateway/devstack/Caddyfile"
    )


_BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("NZ_")}

ENV_COMBINATIONS: dict[str, dict[str, str]] = {
    "production defaults": {},
    "local http": {"NZ_SITE_ADDRESS": "http://127.0.0.1:8080", "NZ_CADDY_ADMIN": "off"},
    "two upstreams each": {
        "NZ_SITE_ADDRESS": "http://127.0.0.1:8080",
        "NZ_AUTH_UPSTREAM": "127.0.0.1:9001 127.0.0.1:9002",
        "NZ_PROXY_UPSTREAM": "127.0.0.1:9003 127.0.0.1:9004",
        "NZ_CADDY_ADMIN": "127.0.0.1:2999",
        "NZ_CADDY_BIND": "loopback",
    },
    "compose dns discovery": {
        "NZ_UPSTREAM_DISCOVERY": "dns",
        "NZ_AUTH_DNS_NAME": "auth",
        "NZ_PROXY_DNS_NAME": "proxy",
    },
    "custom body limit": {"NZ_SITE_ADDRESS": "http://:8080", "NZ_MAX_BODY": "1MB"},
}


def _run_caddy(
    args: list[str], env: dict[str, str], version: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_caddy(version), *args, "--adapter", "caddyfile", "--config", str(CADDYFILE)],
        env={**_BASE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("version", list(CADDIES) or ["none"])
@pytest.mark.parametrize("env", ENV_COMBINATIONS.values(), ids=ENV_COMBINATIONS.keys())
def test_caddy_validates_the_caddyfile(env: dict[str, str], version: str) -> None:
    result = _run_caddy(["validate"], env, version if version in CADDIES else None)
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddyfile_is_formatted() -> None:
    result = subprocess.run(
        [_caddy(), "fmt", str(CADDYFILE)], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout == CADDYFILE.read_text()


def _adapted(env: dict[str, str]) -> dict[str, Any]:
    result = _run_caddy(["adapt"], env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert isinstance(config, dict)
    return config


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every handler object in the adapted config, depth first, in order."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "handler" in node:
            found.append(node)
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item))
    return found


def test_adapted_config_strips_gateway_headers_before_forward_auth() -> None:
    config = _adapted(ENV_COMBINATIONS["two upstreams each"])
    handlers = _walk(config["apps"]["http"]["servers"]["srv0"]["routes"])
    names = [h["handler"] for h in handlers]
    deletes = [
        d
        for h in handlers
        if h["handler"] == "headers"
        for d in h.get("request", {}).get("delete", [])
    ]
    assert {d.lower() for d in deletes} >= {"x-nz*", "x_nz*"}
    first_delete = next(i for i, h in enumerate(handlers) if h["handler"] == "headers")
    proxies = [h for h in handlers if h["handler"] == "reverse_proxy"]
    auth, proxy = proxies[0], proxies[-1]
    assert first_delete < names.index("reverse_proxy")
    # forward_auth: GET /authorize on both auth upstreams, identity copied on 2xx only
    assert auth["rewrite"] == {"method": "GET", "uri": "/authorize"}
    assert [u["dial"] for u in auth["upstreams"]] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    copied = auth["handle_response"][0]
    assert copied["match"] == {"status_code": [2]}
    assert "X-Nz-Identity" in json.dumps(copied["routes"])
    # the proxy: both upstreams, every chunk flushed, no compression anywhere
    assert [u["dial"] for u in proxy["upstreams"]] == ["127.0.0.1:9003", "127.0.0.1:9004"]
    assert proxy["flush_interval"] == -1
    assert "encode" not in names
    assert config["admin"] == {"listen": "127.0.0.1:2999"}


def test_adapted_config_limits_bodies_and_keeps_keys_out_of_the_access_log() -> None:
    config = _adapted(ENV_COMBINATIONS["local http"])
    assert config["admin"] == {"disabled": True}
    server = config["apps"]["http"]["servers"]["srv0"]
    assert server["listen"] == [":8080"]
    assert "write_timeout" not in server, "a model stream may outlast any write timeout"
    body = next(h for h in _walk(server) if h["handler"] == "request_body")
    assert body["max_size"] == 64 * 1024 * 1024  # 64MiB: a hard cap above the proxy's limit
    # the proxy refuses first and reads a refused body to Caddy's cap before its 413
    limit = next(f.default for f in dataclasses.fields(Settings) if f.name == "max_body_bytes")
    assert isinstance(limit, int)
    assert limit < body["max_size"] <= limit + DRAIN_BYTES
    logs = config["logging"]["logs"]
    fields = next(log["encoder"]["fields"] for log in logs.values() if "encoder" in log)
    assert fields["request>headers>Authorization"] == {"filter": "delete"}


def test_adapted_config_uses_dns_discovery_in_compose() -> None:
    config = _adapted(ENV_COMBINATIONS["compose dns discovery"])
    proxies = [
        h for h in _walk(config["apps"]["http"]["servers"]) if h["handler"] == "reverse_proxy"
    ]
    dynamic = [p["dynamic_upstreams"] for p in proxies]
    assert [(d["source"], d["name"], d["port"]) for d in dynamic] == [
        ("a", "auth", "8081"),
        ("a", "proxy", "8082"),
    ]
    server = config["apps"]["http"]["servers"]["srv0"]
    assert server["listen"] == [":443"], "automatic HTTPS for api.neuronetz.ai"


def test_service_argv_is_what_serve_accepts() -> None:
    """The argv the e2e tests and the Dockerfile share is a valid ``serve`` command line."""
    from typer.testing import CliRunner

    from neuronetz_gateway.cli.main import app

    argv = service_argv("auth", "127.0.0.1", 1)
    assert shlex.join(argv).startswith("serve auth ")
    result = CliRunner().invoke(app, [*argv[:2], "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output
    assert "--port" in result.output
