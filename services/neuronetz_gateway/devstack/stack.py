"""The whole gateway on one machine: what ``neuronetz-gateway dev`` runs.

Order of start-up: Postgres and Redis (from ``NZ_DATABASE_URL`` /
``NZ_REDIS_URL``, else throwaway local servers), migrations, a demo tenant
and key, Ollama (``NZ_OLLAMA_URL`` when it answers, else the bundled
simulator), auth, proxy, Caddy with the repository's Caddyfile. ``stop()``
undoes all of it in reverse and deletes the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.devstack.caddyfile import locate_caddyfile
from neuronetz_gateway.devstack.processes import (
    ManagedProcess,
    http_status,
    pick_port,
    wait_until,
)
from neuronetz_gateway.devstack.servers import MissingDependency, ThrowawayPostgres, ThrowawayRedis
from neuronetz_gateway.domain.backends import BackendSpec
from neuronetz_gateway.domain.errors import Conflict
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings

__all__ = [
    "DEMO_TENANT",
    "DevBackend",
    "DevStack",
    "DevStackOptions",
    "StackInfo",
    "fleet_models",
    "register_dev_backends",
]

DEMO_TENANT = "demo"
DEFAULT_CADDY_PORT = 8080
DEFAULT_AUTH_PORT = 8081
DEFAULT_PROXY_PORT = 8082
DEFAULT_SIMULATOR_PORT = 11435
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
READY_TIMEOUT_SECONDS = 60.0

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DevStackOptions:
    """What the operator chose; the environment fills in the rest."""

    caddy_port: int = DEFAULT_CADDY_PORT
    force_simulator: bool = False
    caddyfile: Path | None = None
    #: start this many simulators, each a GPU with its own models, as the fleet's backends
    backends: int = 0


@dataclass(slots=True)
class StackInfo:
    """What the stack tells its user once it is up."""

    url: str
    key: str
    key_prefix: str
    model: str
    using_simulator: bool
    ollama_url: str
    state_dir: Path
    pids: dict[str, int] = field(default_factory=dict)
    #: the simulated fleet (``--backends N``), registered with ``backend add``
    backends: list[DevBackend] = field(default_factory=list)


#: The chat models the simulated fleet shares out; every backend also has the embedder.
FLEET_CHAT_MODELS = ("llama3.2:latest", "qwen2.5:0.5b", "mistral:latest", "phi3:mini")
FLEET_EMBED_MODEL = "nomic-embed-text:latest"
#: Each simulated GPU: slots per model, models loaded at once, a cold load, a speed.
FLEET_SLOTS = 2
FLEET_GPU_FLAGS: tuple[str, ...] = ("--slots", "2", "--max-loaded", "2", "--load-seconds", "2")
FLEET_GPU_FLAGS += ("--tokens-per-second", "40")


@dataclass(frozen=True, slots=True)
class DevBackend:
    """One simulated GPU of ``dev --backends N``."""

    name: str
    url: str
    models: tuple[str, ...]
    loaded: str


def fleet_models(index: int) -> tuple[str, ...]:
    """Backend ``index``'s models: two chat models (overlapping its neighbours'), the embedder.

    So with three backends every chat model but one is on two of them, and a
    request for it has a choice; ``phi3:mini`` only on the third.
    """
    count = len(FLEET_CHAT_MODELS)
    chat = (FLEET_CHAT_MODELS[index % count], FLEET_CHAT_MODELS[(index + 1) % count])
    return (*chat, FLEET_EMBED_MODEL)


async def register_dev_backends(database_url: str, backends: Sequence[DevBackend]) -> None:
    """Make ``backends`` the fleet's ``sim*`` backends (a reused database's old ones replaced)."""
    pool = await open_pool(database_url, min_size=1, max_size=2)
    try:
        store = Store(pool)
        for record in await store.list_backends():
            if record.spec.name.startswith("sim"):
                await store.remove_backend(record.spec.name)
        for backend in backends:
            await store.add_backend(BackendSpec.checked(backend.name, backend.url, FLEET_SLOTS))
    finally:
        await pool.close()


def _answers_ok(url: str) -> bool:
    return http_status(url) == 200


def _simple_model_name(name: str) -> str:
    return name.removesuffix(":latest")


def _first_chat_model(ollama_url: str) -> str | None:
    """The first non-embedding model Ollama lists, or None."""
    try:
        models = httpx.get(f"{ollama_url}/api/tags", timeout=2.0).json().get("models") or []
    except (httpx.HTTPError, ValueError):
        return None
    names = [str(m.get("name", "")) for m in models if isinstance(m, dict)]
    chat = [n for n in names if n and "embed" not in n]
    return _simple_model_name(chat[0]) if chat else None


class DevStack:
    """Starts and stops every part; ``start`` returns what to print."""

    def __init__(
        self,
        options: DevStackOptions,
        environ: Mapping[str, str],
        *,
        say: Say,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self._options = options
        self._environ = dict(environ)
        self._say = say
        self._should_stop = should_stop
        self._state_dir = Path(tempfile.mkdtemp(prefix="nz-dev-"))
        self._logs = self._state_dir / "logs"
        self._logs.mkdir()
        self._postgres: ThrowawayPostgres | None = None
        self._redis: ThrowawayRedis | None = None
        self._children: list[ManagedProcess] = []  # in start order

    @property
    def state_dir(self) -> Path:
        """Logs, the audit spool and Caddy's data; deleted by ``stop``."""
        return self._state_dir

    @property
    def children(self) -> list[ManagedProcess]:
        """The running child processes, in start order."""
        return list(self._children)

    # ------------------------------------------------------------------ start

    def _checkpoint(self) -> None:
        if self._should_stop():
            raise InterruptedError("stop requested")

    def start(self) -> StackInfo:
        """Bring everything up; on any failure the caller must still call ``stop``."""
        caddy = shutil.which("caddy")
        if caddy is None:
            raise MissingDependency(
                "caddy not found on PATH (Debian: `apt install caddy`; "
                "others: https://caddyserver.com/docs/install)"
            )
        caddyfile = locate_caddyfile(self._options.caddyfile)
        database_url = self._database_url()
        self._checkpoint()
        redis_url = self._redis_url()
        self._checkpoint()
        self._say("applying migrations")
        asyncio.run(apply_migrations(database_url))
        key, prefix = asyncio.run(self._create_demo_key(database_url))
        self._checkpoint()

        fleet: list[DevBackend] = []
        if self._options.backends > 0:
            fleet = self._fleet(self._options.backends)
            asyncio.run(register_dev_backends(database_url, fleet))
            ollama_url, using_simulator = fleet[0].url, True
        else:
            ollama_url, using_simulator = self._ollama()
        self._checkpoint()
        taken = [self._options.caddy_port, DEFAULT_CADDY_PORT]
        auth_port = pick_port(DEFAULT_AUTH_PORT, taken=taken)
        proxy_port = pick_port(DEFAULT_PROXY_PORT, taken=[*taken, auth_port])
        env = {
            **self._environ,
            "NZ_DATABASE_URL": database_url,
            "NZ_REDIS_URL": redis_url,
            "NZ_OLLAMA_URL": ollama_url,
            **({"NZ_OLLAMA_SLOTS": str(FLEET_SLOTS)} if fleet else {}),
            "NZ_GATEWAY_SECRET": self._gateway_secret(),
            "NZ_AUDIT_SPOOL_DIR": str(self._state_dir / "spool"),
        }
        auth = self._spawn_service("auth", auth_port, env)
        proxy = self._spawn_service("proxy", proxy_port, env)
        for name, port, proc in (("auth", auth_port, auth), ("proxy", proxy_port, proxy)):
            readyz = f"http://127.0.0.1:{port}/readyz"
            wait_until(
                functools.partial(_answers_ok, readyz),
                what=f"the {name} service ({readyz})",
                timeout=READY_TIMEOUT_SECONDS,
                watch=[proc],
                should_stop=self._should_stop,
            )

        caddy_port = pick_port(
            self._options.caddy_port, taken=[auth_port, proxy_port], host="127.0.0.1"
        )
        if caddy_port != self._options.caddy_port:
            self._say(f"port {self._options.caddy_port} is taken; Caddy uses {caddy_port}")
        url = f"http://127.0.0.1:{caddy_port}"
        caddy_env = {
            **self._environ,
            "NZ_SITE_ADDRESS": url,
            "NZ_CADDY_BIND": "loopback",
            "NZ_CADDY_ADMIN": "off",
            "NZ_UPSTREAM_DISCOVERY": "static",
            "NZ_AUTH_UPSTREAM": f"127.0.0.1:{auth_port}",
            "NZ_PROXY_UPSTREAM": f"127.0.0.1:{proxy_port}",
            # Caddy keeps its autosave and certificates here, not in the user's home.
            "XDG_CONFIG_HOME": str(self._state_dir / "caddy-config"),
            "XDG_DATA_HOME": str(self._state_dir / "caddy-data"),
        }
        proc = self._spawn(
            "caddy",
            [caddy, "run", "--adapter", "caddyfile", "--config", str(caddyfile)],
            caddy_env,
        )
        # Through Caddy without a key: a 401 proves Caddy -> auth works.
        wait_until(
            lambda: http_status(f"{url}/api/version") == 401,
            what=f"Caddy ({url})",
            timeout=READY_TIMEOUT_SECONDS,
            watch=[proc],
            should_stop=self._should_stop,
        )
        model = _first_chat_model(ollama_url) or "llama3.2"
        return StackInfo(
            url=url,
            key=key,
            key_prefix=prefix,
            model=model,
            using_simulator=using_simulator,
            ollama_url=ollama_url,
            state_dir=self._state_dir,
            pids={p.name: p.pid for p in self._children},
            backends=fleet,
        )

    def _database_url(self) -> str:
        url = self._environ.get("NZ_DATABASE_URL")
        if url:
            self._say("Postgres: NZ_DATABASE_URL")
            return url
        self._say("Postgres: starting a throwaway server (NZ_DATABASE_URL is unset)")
        self._postgres = ThrowawayPostgres(detach=True)
        self._say(
            f"Postgres: 127.0.0.1:{self._postgres.port}, data in {self._postgres.dir}"
            " (deleted on exit)"
        )
        admin = self._postgres.admin_url
        asyncio.run(_create_database(admin, "neuronetz"))
        return admin.rsplit("/", 1)[0] + "/neuronetz"

    def _redis_url(self) -> str:
        url = self._environ.get("NZ_REDIS_URL")
        if url:
            self._say("Redis: NZ_REDIS_URL")
            return url
        self._say("Redis: starting a throwaway server (NZ_REDIS_URL is unset)")
        self._redis = ThrowawayRedis(detach=True)
        self._say(f"Redis: 127.0.0.1:{self._redis.port} (in memory only)")
        return self._redis.url

    def _gateway_secret(self) -> str:
        secret = self._environ.get("NZ_GATEWAY_SECRET")
        if secret:
            return secret
        self._say("NZ_GATEWAY_SECRET is unset: using a random one for this session")
        return secrets.token_urlsafe(48)

    async def _create_demo_key(self, database_url: str) -> tuple[str, str]:
        pool = await open_pool(database_url, min_size=1, max_size=2)
        try:
            store = Store(pool)
            # A database from an earlier session already has it: reuse it.
            with contextlib.suppress(Conflict):
                await store.create_tenant(DEMO_TENANT, PolicySettings())
            key = generate_key()
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            await store.create_key(
                tenant_name=DEMO_TENANT,
                name=f"dev-{stamp}-{secrets.token_hex(2)}",
                prefix=key.prefix,
                secret_hash=KeyHasher().hash(key.full),
                policy=PolicySettings(),
                expires_at=None,
                log_prompts=False,
                prompt_ttl_days=None,
            )
        finally:
            await pool.close()
        return key.full, key.prefix

    def _ollama(self) -> tuple[str, bool]:
        configured = self._environ.get("NZ_OLLAMA_URL") or DEFAULT_OLLAMA_URL
        configured = configured.rstrip("/")
        if not self._options.force_simulator:
            if http_status(f"{configured}/api/version", timeout=1.5) == 200:
                self._say(f"Ollama: {configured}")
                return configured, False
            reason = f"no Ollama answers at {configured}"
        else:
            reason = "--simulator was given"
        port = pick_port(DEFAULT_SIMULATOR_PORT)
        url = f"http://127.0.0.1:{port}"
        banner = "!" * 72
        self._say(banner)
        self._say(f"!! {reason}:")
        self._say(f"!! using the BUNDLED OLLAMA SIMULATOR at {url}")
        self._say("!! (canned answers, not a model; set NZ_OLLAMA_URL to use a real Ollama)")
        self._say(banner)
        proc = self._spawn(
            "simulator",
            [
                sys.executable,
                "-P",
                "-m",
                "neuronetz_gateway.simulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            self._environ,
        )
        wait_until(
            functools.partial(_answers_ok, f"{url}/api/version"),
            what=f"the Ollama simulator ({url})",
            timeout=READY_TIMEOUT_SECONDS,
            watch=[proc],
            should_stop=self._should_stop,
        )
        return url, True

    def _fleet(self, count: int) -> list[DevBackend]:
        """``count`` simulators, each a GPU with its own models (one of them warm)."""
        self._say(f"Ollama: {count} BUNDLED SIMULATORS as the fleet's backends (not real models)")
        fleet: list[DevBackend] = []
        taken: list[int] = [self._options.caddy_port, DEFAULT_AUTH_PORT, DEFAULT_PROXY_PORT]
        started: list[tuple[DevBackend, ManagedProcess]] = []
        for index in range(count):
            port = pick_port(DEFAULT_SIMULATOR_PORT + index, taken=taken)
            taken.append(port)
            models = fleet_models(index)
            backend = DevBackend(f"sim{index + 1}", f"http://127.0.0.1:{port}", models, models[0])
            argv = [sys.executable, "-P", "-m", "neuronetz_gateway.simulator"]
            argv += ["--host", "127.0.0.1", "--port", str(port), "--models", ",".join(models)]
            argv += ["--loaded", backend.loaded, *FLEET_GPU_FLAGS]
            started.append((backend, self._spawn(backend.name, argv, self._environ)))
        for backend, proc in started:
            wait_until(
                functools.partial(_answers_ok, f"{backend.url}/api/version"),
                what=f"the simulator {backend.name} ({backend.url})",
                timeout=READY_TIMEOUT_SECONDS,
                watch=[proc],
                should_stop=self._should_stop,
            )
            self._say(f"backend {backend.name}: {backend.url} {', '.join(backend.models)}")
            fleet.append(backend)
        return fleet

    def _spawn_service(self, service: str, port: int, env: Mapping[str, str]) -> ManagedProcess:
        argv = [
            sys.executable,
            "-P",  # not the current directory on sys.path: nothing there may shadow a module
            "-c",
            "from neuronetz_gateway.cli.main import main; main()",
            "serve",
            service,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        return self._spawn(service, argv, env)

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> ManagedProcess:
        # cwd: a fresh directory, so nothing where the user stands can shadow a module
        # (Granian's spawned workers put the working directory on sys.path).
        proc = ManagedProcess(
            name, argv, env=env, log_path=self._logs / f"{name}.log", cwd=self._state_dir
        )
        self._children.append(proc)
        return proc

    # ------------------------------------------------------------------ watch and stop

    def check_alive(self) -> None:
        """Raise ``ProcessDied`` when a child has exited on its own."""
        for proc in self._children:
            proc.check_alive()

    def stop(self) -> None:
        """Stop everything this stack started, newest first, and delete its state."""
        errors: list[str] = []
        for proc in reversed(self._children):
            self._say(f"stopping {proc.name}")
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                errors.append(f"{proc.name}: {exc}")
        self._children.clear()
        if self._redis is not None:
            self._say("stopping Redis")
            self._redis.destroy()
            self._redis = None
        if self._postgres is not None:
            self._say("stopping Postgres")
            self._postgres.destroy()
            self._postgres = None
        shutil.rmtree(self._state_dir, ignore_errors=True)
        if errors:
            self._say("some parts did not stop cleanly: " + "; ".join(errors))


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
