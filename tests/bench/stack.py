"""Every process the benchmark measures, started on 127.0.0.1 and stopped again.

- ``simulator``: the bundled Ollama simulator (one Granian worker, recording off);
- ``caddy_direct``: Caddy with a minimal generated Caddyfile, ``reverse_proxy``
  straight to the simulator with ``flush_interval -1``;
- the full gateway: throwaway Postgres and Redis, migrations, a tenant and key
  with every limit and budget set high but on, ``serve auth``, ``serve proxy``
  and Caddy with the repository's ``caddy/Caddyfile``;
- ``trivial``: the no-op Litestar handler on the auth service's Granian settings;
- ``litellm``: LiteLLM's proxy from its own venv;
- the bare chain (:mod:`tests.bench.bare_chain`): ``caddy_bare`` (the
  repository's Caddyfile) in front of ``bare_auth`` and ``bare_proxy``, on
  the gateway's Redis and the simulator;
- for single experiments: the auth service once more on a local Redis
  Cluster (``auth_cluster``), under other Granian settings
  (``granian_<variant>``), and the bare auth on RSGI (``bare_auth_rsgi``).

A part that cannot start is recorded in :attr:`BenchStack.unavailable` with
the reason (and its log's tail), and the run goes on without it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import asyncpg
import httpx
import redis

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.devstack.processes import (
    ManagedProcess,
    ProcessDied,
    StartupTimeout,
    http_status,
    wait_until,
)
from neuronetz_gateway.devstack.servers import ThrowawayPostgres, ThrowawayRedis, free_port
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from tests.bench.bare_chain import IDENTITY_KEY
from tests.bench.litellm_peer import (
    LiteLLMInstall,
    litellm_command,
    litellm_config,
    litellm_env,
)
from tests.bench.procs import ServiceProcess
from tests.bench.variants import authorize_headers
from tests.support.redis_deployments import RedisDeployment, start_deployment

__all__ = ["HIGH_LIMITS", "REPO_ROOT", "BenchStack", "StartFailed"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CADDYFILE = REPO_ROOT / "caddy" / "Caddyfile"
BENCH_TENANT = "bench"
#: Every limit and budget on, far above what a run can reach: the checks run, none refuses.
HIGH_LIMITS = PolicySettings(
    rpm=1_000_000_000,
    tpm=10**15,
    concurrency=1_000_000,
    daily_tokens=10**15,
    monthly_tokens=10**15,
    total_tokens=10**15,
)
_READY_TIMEOUT = 60.0


class StartFailed(RuntimeError):
    """A part of the stack did not come up; the message says why."""


def _answers(url: str, status: int) -> bool:
    return http_status(url) == status


def _minimal_caddyfile(port: int, upstream: str) -> str:
    return (
        "{\n\tadmin off\n}\n"
        f"http://127.0.0.1:{port} {{\n"
        f"\treverse_proxy {upstream} {{\n\t\tflush_interval -1\n\t}}\n"
        "}\n"
    )


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class BenchStack:
    """Starts the measured processes; ``stop()`` undoes everything it started."""

    def __init__(self, state_dir: Path, *, say: Callable[[str], None]) -> None:
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._say = say
        self._children: list[ManagedProcess] = []
        self._postgres: ThrowawayPostgres | None = None
        self._redis: ThrowawayRedis | None = None
        self._cluster: RedisDeployment | None = None
        self._gateway_env: dict[str, str] = {}
        self.services: dict[str, ServiceProcess] = {}
        self.unavailable: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.key = ""
        self.key_prefix = ""
        self.python = sys.executable

    # ------------------------------------------------------------------ helpers

    def _spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], *, quiet_stdout: bool = False
    ) -> ManagedProcess:
        child = ManagedProcess(
            name,
            argv,
            env=env,
            log_path=self.logs / f"{name}.log",
            cwd=REPO_ROOT,
            quiet_stdout=quiet_stdout,
        )
        self._children.append(child)
        self.services[name] = ServiceProcess(name, child.pid)
        return child

    def _wait(self, child: ManagedProcess, ready: Callable[[], bool], what: str) -> None:
        try:
            wait_until(ready, what=what, timeout=_READY_TIMEOUT, watch=[child])
        except ProcessDied as exc:
            raise StartFailed(str(exc)) from None
        except StartupTimeout as exc:
            raise StartFailed(f"{exc}:\n{child.log_tail()}") from None

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NZ_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        return env

    # ------------------------------------------------------------------ parts

    def start_simulator(self, chunks: int) -> str:
        """The bundled Ollama simulator; returns its URL."""
        port = free_port()
        env = {**self._base_env(), "NZ_SIM_CHUNKS": str(chunks), "NZ_SIM_RECORD": "0"}
        argv = [self.python, "-m", "neuronetz_gateway.simulator", "--port", str(port)]
        child = self._spawn("simulator", [*argv, "--no-record"], env)
        url = f"http://127.0.0.1:{port}"
        self._wait(child, lambda: http_status(f"{url}/api/version") == 200, "the simulator")
        self.urls["simulator"] = url
        return url

    def start_gpu_simulator(self, name: str, args: Sequence[str]) -> str:
        """A simulator modelling a GPU (``args``: ``--models``, ``--slots``...); returns its URL."""
        port = free_port()
        env = {**self._base_env(), "NZ_SIM_RECORD": "0"}
        argv = [self.python, "-m", "neuronetz_gateway.simulator", "--port", str(port)]
        child = self._spawn(name, [*argv, "--no-record", *args], env)
        url = f"http://127.0.0.1:{port}"
        self._wait(child, lambda: http_status(f"{url}/api/version") == 200, name)
        self.urls[name] = url
        return url

    def start_caddy_direct(self) -> None:
        """Caddy alone in front of the simulator (a generated minimal Caddyfile)."""
        try:
            caddy = self._caddy()
            port = free_port()
            upstream = self.urls["simulator"].removeprefix("http://")
            path = self.state_dir / "Caddyfile.direct"
            path.write_text(_minimal_caddyfile(port, upstream))
            env = {**self._base_env(), **self._caddy_dirs("direct")}
            argv = [caddy, "run", "--adapter", "caddyfile", "--config", str(path)]
            child = self._spawn("caddy_direct", argv, env)
            url = f"http://127.0.0.1:{port}"
            self._wait(child, lambda: http_status(f"{url}/api/version") == 200, "Caddy (direct)")
            self.urls["caddy_direct"] = url
        except StartFailed as exc:
            self.unavailable["caddy_direct"] = str(exc)

    def start_trivial(self) -> None:
        """The no-op Litestar ``/authorize`` on the auth service's Granian settings."""
        try:
            port = free_port()
            argv = [self.python, "-m", "tests.bench.trivial_app", "--port", str(port)]
            child = self._spawn("trivial", argv, self._base_env())
            url = f"http://127.0.0.1:{port}"
            self._wait(child, lambda: http_status(f"{url}/authorize") == 200, "the trivial handler")
            self.urls["trivial"] = url
        except StartFailed as exc:
            self.unavailable["trivial"] = str(exc)

    def start_gateway(
        self,
        backends: Sequence[BackendSpec] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Postgres, Redis, a key with high limits, auth, proxy and the repository's Caddy.

        Without ``backends`` the proxy's one backend is the simulator (``NZ_OLLAMA_URL``);
        with them, they are defined in the database (``backend add``) before it starts.
        ``env`` adds gateway settings (``NZ_QUEUE_TIMEOUT_SECONDS``...).
        """
        try:
            self._start_gateway(backends, env or {})
        except (StartFailed, OSError, asyncpg.PostgresError, RuntimeError) as exc:
            self.unavailable["gateway"] = f"{type(exc).__name__}: {exc}"

    def _start_gateway(self, backends: Sequence[BackendSpec], extra: Mapping[str, str]) -> None:
        self._say("gateway: throwaway Postgres and Redis")
        self._postgres = ThrowawayPostgres(detach=True)
        self._redis = ThrowawayRedis(detach=True)
        admin = self._postgres.admin_url
        database_url = admin.rsplit("/", 1)[0] + "/neuronetz"
        asyncio.run(self._prepare_database(admin, database_url, backends))
        self.services["postgres"] = ServiceProcess("postgres", self._postmaster_pid())
        info = redis.Redis.from_url(self._redis.url).info("server")
        self.services["redis"] = ServiceProcess("redis", int(info["process_id"]))
        self.urls["redis"] = self._redis.url

        env = {
            **self._base_env(),
            "NZ_DATABASE_URL": database_url,
            "NZ_REDIS_URL": self._redis.url,
            "NZ_OLLAMA_URL": self.urls.get("simulator", "http://127.0.0.1:11434"),
            "NZ_GATEWAY_SECRET": secrets.token_urlsafe(48),
            "NZ_AUDIT_SPOOL_DIR": str(self.state_dir / "spool"),
            "NZ_REDIS_PREFIX": "nzbench",
            "NZ_LOG_FORMAT": "json",
            **extra,
        }
        self._gateway_env = env
        ports = {}
        for service in ("auth", "proxy"):
            ports[service] = free_port()
            argv = [self.python, "-m", "neuronetz_gateway.cli", "serve", service]
            self._spawn(service, [*argv, "--port", str(ports[service])], env)
        for service in ("auth", "proxy"):
            url = f"http://127.0.0.1:{ports[service]}"
            child = next(c for c in self._children if c.name == service)
            ready = functools.partial(_answers, f"{url}/readyz", 200)
            self._wait(child, ready, f"the {service} service")
            self.urls[service] = url

        self.urls["gateway"] = self._start_caddy("gateway", ports["auth"], ports["proxy"])

    def _start_caddy(self, name: str, auth_port: int, proxy_port: int, ready: int = 401) -> str:
        """The repository's Caddyfile in front of an auth and a proxy; returns its URL.

        Ready when ``GET /api/version`` without a key answers ``ready``: the gateway's 401
        proves Caddy -> auth works; the bare chain lets it through (200 from the simulator).
        """
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        caddy_env = {
            **self._base_env(),
            **self._caddy_dirs(name),
            "NZ_SITE_ADDRESS": url,
            "NZ_CADDY_ADMIN": "off",
            "NZ_UPSTREAM_DISCOVERY": "static",
            "NZ_AUTH_UPSTREAM": f"127.0.0.1:{auth_port}",
            "NZ_PROXY_UPSTREAM": f"127.0.0.1:{proxy_port}",
        }
        argv = [self._caddy(), "run", "--adapter", "caddyfile", "--config", str(CADDYFILE)]
        child = self._spawn(f"caddy_{name}", argv, caddy_env, quiet_stdout=True)
        self._wait(child, lambda: http_status(f"{url}/api/version") == ready, f"Caddy ({name})")
        return url

    def _serve(self, name: str, argv: Sequence[str], env: Mapping[str, str], ready: str) -> str:
        """Start a service on a free port (``--port`` appended); returns its URL once ready."""
        port = free_port()
        child = self._spawn(name, [*argv, "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        self._wait(child, functools.partial(_answers, url + ready, 200), name)
        return url

    def start_bare_chain(self) -> None:
        """The yardstick: the same Caddy, the bare auth (one Redis GET) and passthrough proxy."""
        if "auth" not in self.urls:
            self.unavailable["bare_chain"] = "needs the gateway (its Redis, a real identity)"
            return
        try:
            # what it answers with: a real identity for the benchmark key, as long as ours
            host = self.urls["gateway"].removeprefix("http://")
            answer = httpx.get(
                self.urls["auth"] + "/authorize",
                headers=authorize_headers(self.key, host),
                timeout=10,
            )
            identity = answer.headers.get("x-nz-identity")
            if answer.status_code != 200 or not identity:
                self.unavailable["bare_chain"] = f"no identity from auth: HTTP {answer.status_code}"
                return
            redis.Redis.from_url(self.urls["redis"]).set(IDENTITY_KEY, identity)
            env = {
                **self._base_env(),
                "NZ_BARE_REDIS_URL": self.urls["redis"],
                "NZ_BARE_UPSTREAM": self.urls["simulator"],
            }
            module = [self.python, "-m", "tests.bench.bare_chain"]
            auth = self._serve("bare_auth", [*module, "auth"], env, "/healthz")
            proxy = self._serve("bare_proxy", [*module, "proxy"], env, "/healthz")
            self.urls["bare_auth"] = auth
            self.urls["bare"] = self._start_caddy(
                "bare", _port_of(auth), _port_of(proxy), ready=200
            )
        except (StartFailed, OSError, redis.RedisError, httpx.HTTPError) as exc:
            self.unavailable["bare_chain"] = f"{type(exc).__name__}: {exc}"

    def start_bare_rsgi(self) -> None:
        """The bare auth once more, on Granian's RSGI interface."""
        try:
            env = {**self._base_env(), "NZ_BARE_REDIS_URL": self.urls["redis"]}
            argv = [self.python, "-m", "tests.bench.bare_chain", "auth-rsgi"]
            self.urls["bare_auth_rsgi"] = self._serve("bare_auth_rsgi", argv, env, "/healthz")
        except (StartFailed, KeyError) as exc:
            self.unavailable["bare_auth_rsgi"] = f"{type(exc).__name__}: {exc}"

    def start_granian_variant(self, variant: str) -> None:
        """The auth service under one of :data:`tests.bench.granian_variants.GRANIAN_VARIANTS`."""
        name = f"granian_{variant}"
        try:
            argv = [self.python, "-m", "tests.bench.granian_variants", variant]
            self.urls[name] = self._serve(name, argv, self._gateway_env, "/readyz")
        except StartFailed as exc:
            self.unavailable[name] = str(exc)

    def start_cluster_auth(self) -> None:
        """A local Redis Cluster (3 masters, 3 replicas), the auth service and a proxy on it."""
        try:
            self._say("Redis Cluster: 6 nodes")
            self._cluster = start_deployment("cluster", parent=str(self.state_dir))
            env = {**self._gateway_env, "NZ_REDIS_URL": self._cluster.url}
            serve = [self.python, "-m", "neuronetz_gateway.cli", "serve"]
            # A proxy too, idle: on a fresh Redis the limiter's budgets wait (failing
            # closed) until an audit writer has reported its unwritten rows there.
            self.urls["proxy_cluster"] = self._serve(
                "proxy_cluster", [*serve, "proxy"], env, "/readyz"
            )
            self.urls["auth_cluster"] = self._serve(
                "auth_cluster", [*serve, "auth"], env, "/readyz"
            )
        except (StartFailed, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            self.unavailable["auth_cluster"] = f"{type(exc).__name__}: {exc}"

    async def _prepare_database(
        self, admin_url: str, database_url: str, backends: Sequence[BackendSpec] = ()
    ) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute('CREATE DATABASE "neuronetz"')
        finally:
            await conn.close()
        await apply_migrations(database_url)
        pool = await open_pool(database_url, min_size=1, max_size=2)
        try:
            store = Store(pool)
            for backend in backends:
                await store.add_backend(backend)
            await store.create_tenant(BENCH_TENANT, HIGH_LIMITS)
            key = generate_key()
            await store.create_key(
                tenant_name=BENCH_TENANT,
                name="bench-1",
                prefix=key.prefix,
                secret_hash=KeyHasher().hash(key.full),
                policy=HIGH_LIMITS,
                expires_at=None,
                log_prompts=False,
                prompt_ttl_days=None,
            )
        finally:
            await pool.close()
        self.key, self.key_prefix = key.full, key.prefix

    def _postmaster_pid(self) -> int:
        assert self._postgres is not None
        return int((self._postgres.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def start_litellm(self, install: LiteLLMInstall) -> None:
        """LiteLLM's proxy on the simulator (its install must be finished)."""
        try:
            config = self.state_dir / "litellm.yaml"
            config.write_text(litellm_config(self.urls["simulator"]))
            port = free_port()
            argv = litellm_command(install, config, port)
            child = self._spawn("litellm", argv, litellm_env(dict(os.environ)))
            url = f"http://127.0.0.1:{port}"
            self._wait(child, lambda: http_status(f"{url}/health/liveliness") == 200, "LiteLLM")
            self.urls["litellm"] = url
        except StartFailed as exc:
            self.unavailable["litellm"] = str(exc)

    def _caddy(self) -> str:
        caddy = shutil.which("caddy")
        if caddy is None:
            raise StartFailed("caddy not found on PATH")
        return caddy

    def _caddy_dirs(self, name: str) -> dict[str, str]:
        return {
            "XDG_CONFIG_HOME": str(self.state_dir / f"caddy-{name}" / "config"),
            "XDG_DATA_HOME": str(self.state_dir / f"caddy-{name}" / "data"),
        }

    # ------------------------------------------------------------------ stop

    def stop_services(self, names: Sequence[str]) -> None:
        """Stop the named children (a phase's extra processes); their URLs go."""
        for child in [c for c in self._children if c.name in names]:
            child.stop()
            self._children.remove(child)
            self.urls.pop(child.name, None)
            self.services.pop(child.name, None)

    def stop_cluster(self) -> None:
        """Stop the Redis Cluster (when one was started)."""
        if self._cluster is not None:
            self._cluster.destroy()
            self._cluster = None

    def stop(self) -> None:
        """Stop every child (newest first), then Redis and Postgres."""
        for child in reversed(self._children):
            child.stop()
        self._children.clear()
        self.stop_cluster()
        if self._redis is not None:
            self._redis.destroy()
            self._redis = None
        if self._postgres is not None:
            self._postgres.destroy()
            self._postgres = None
