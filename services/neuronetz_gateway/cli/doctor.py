"""``neuronetz-gateway doctor``: what is wrong with this deployment, one line per check.

Checks, in order: the settings (``NZ_*``), the secret's strength, Postgres
(reachable, every migration applied), Redis (reachable, which deployment),
the Ollama backend (version, models) and the Caddyfile (``caddy validate``).
Each check is ``ok``, ``warn`` (works, but look at it), ``fail`` or ``skip``
(could not run because an earlier one failed). The exit code is 1 when any
check failed. ``--json`` prints ``{"ok": bool, "checks": [{"name", "status",
"detail"}]}``. Nothing secret is printed: no DSN password, no secret.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import typer

from neuronetz_gateway.settings import Settings, SettingsError, load_settings

__all__ = ["Check", "doctor", "run_checks"]

_TIMEOUT = 3.0
_MIN_SECRET = 16
_GOOD_SECRET = 32
_MIN_DISTINCT = 10
_MIGRATIONS_PACKAGE = "neuronetz_gateway.adapters.postgres.migrations"
_PACKAGED_CADDYFILE = Path(__file__).resolve().parents[1] / "devstack" / "Caddyfile"


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` is ``ok``, ``warn``, ``fail`` or ``skip``."""

    name: str
    status: str
    detail: str


def _where(url: str) -> str:
    """host:port/path of a URL, never its credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def _error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_secret(settings: Settings) -> Check:
    """Length and variety of ``NZ_GATEWAY_SECRET`` (and that a previous one differs)."""
    secret = settings.gateway_secret.get()
    if len(secret) < _MIN_SECRET:
        return Check("secret", "fail", f"NZ_GATEWAY_SECRET has {len(secret)} characters: use 32+")
    if settings.gateway_secret_previous.get() == secret:
        return Check("secret", "warn", "NZ_GATEWAY_SECRET_PREVIOUS equals NZ_GATEWAY_SECRET")
    if len(secret) < _GOOD_SECRET:
        return Check("secret", "warn", f"{len(secret)} characters; 32+ random ones recommended")
    if len(set(secret)) < _MIN_DISTINCT:
        return Check("secret", "warn", f"only {len(set(secret))} distinct characters: not random")
    return Check("secret", "ok", f"{len(secret)} characters")


def expected_migrations() -> set[str]:
    """The ids of every migration the package ships."""
    package = importlib.import_module(_MIGRATIONS_PACKAGE)
    ids: set[str] = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{_MIGRATIONS_PACKAGE}.{info.name}")
        migration_id = getattr(module, "ID", None)
        if isinstance(migration_id, str):
            ids.add(migration_id)
    return ids


async def check_postgres(url: str) -> list[Check]:
    """Reachable, and every shipped migration applied."""
    where = _where(url)
    try:
        conn = await asyncpg.connect(url, timeout=_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return [
            Check("postgres", "fail", f"{where}: {_error(exc)}"),
            Check("migrations", "skip", "Postgres unreachable"),
        ]
    try:
        version = await conn.fetchval("SHOW server_version")
        try:
            rows = await conn.fetch("SELECT name FROM migration WHERE app_name = 'gateway'")
        except asyncpg.UndefinedTableError:
            rows = []
    finally:
        await conn.close()
    found = [Check("postgres", "ok", f"PostgreSQL {version} at {where}")]
    pending = sorted(expected_migrations() - {r["name"] for r in rows})
    if pending:
        detail = f"{len(pending)} pending ({', '.join(pending)}): run `neuronetz-gateway migrate`"
        found.append(Check("migrations", "fail", detail))
    else:
        found.append(Check("migrations", "ok", f"all {len(expected_migrations())} applied"))
    return found


async def check_redis(url: str) -> Check:
    """Reachable, and which deployment answers (standalone, cluster, sentinel; version)."""
    import redis.asyncio as aioredis  # here: every other CLI command starts without it

    client = aioredis.Redis.from_url(url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT)
    try:
        await client.ping()
        info: dict[str, Any] = await client.info("server")
        replication: dict[str, Any] = await client.info("replication")
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Check("redis", "fail", f"{_where(url)}: {_error(exc)}")
    finally:
        await client.aclose()
    mode = info.get("redis_mode", "standalone")
    role = replication.get("role", "?")
    detail = f"Redis {info.get('redis_version', '?')} {mode} ({role}) at {_where(url)}"
    if role != "master":
        return Check("redis", "warn", detail + ": not a primary, writes will fail")
    return Check("redis", "ok", detail)


async def check_ollama(url: str, name: str = "ollama") -> Check:
    """The backend answers: its version and installed models."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT) as client:
            version = (await client.get("/api/version")).raise_for_status().json()
            tags = (await client.get("/api/tags")).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as exc:
        return Check(name, "fail", f"{_where(url)}: {_error(exc)}")
    models = sorted(
        str(m.get("name") or m.get("model")) for m in tags.get("models", []) if isinstance(m, dict)
    )
    detail = f"Ollama {version.get('version', '?')} at {_where(url)}, {len(models)} models"
    if not models:
        return Check(name, "warn", detail + ": no model installed, every request is refused")
    shown = ", ".join(models[:5]) + (", ..." if len(models) > 5 else "")
    return Check(name, "ok", f"{detail}: {shown}")


async def defined_backends(database_url: str) -> list[tuple[str, str, str]]:
    """The backends defined with ``backend add`` (name, url, state); none if unreadable."""
    try:
        conn = await asyncpg.connect(database_url, timeout=_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return []  # the postgres check says why
    try:
        rows = await conn.fetch("SELECT name, url, state FROM backend ORDER BY name")
    except asyncpg.PostgresError:  # not migrated yet: the migrations check says so
        return []
    finally:
        await conn.close()
    return [(r["name"], r["url"], r["state"]) for r in rows]


async def check_backends(settings: Settings) -> list[Check]:
    """``NZ_OLLAMA_URL`` when no backend is defined, else each defined backend.

    A draining backend that does not answer is a warning: it takes no new request.
    """
    backends = await defined_backends(settings.database_url)
    if not backends:
        return [await check_ollama(settings.ollama_url)]
    found = await asyncio.gather(*(check_ollama(url, f"backend {n}") for n, url, _ in backends))
    checks = [
        Check("ollama", "skip", f"{len(backends)} backends defined: NZ_OLLAMA_URL is not used")
    ]
    for answered, (_, _, state) in zip(found, backends, strict=True):
        if state != "active" and answered.status == "fail":  # takes no new request
            checks.append(Check(answered.name, "warn", f"{answered.detail} ({state})"))
        else:
            checks.append(answered)
    return checks


def check_caddyfile(path: Path | None) -> Check:
    """``caddy validate`` on the Caddyfile (the given one, ./caddy/Caddyfile or the packaged)."""
    if path is None:
        local = Path("caddy/Caddyfile")
        path = local if local.is_file() else _PACKAGED_CADDYFILE
    if not path.is_file():
        return Check("caddyfile", "fail", f"{path}: no such file")
    caddy = shutil.which("caddy")
    if caddy is None:
        return Check("caddyfile", "warn", f"{path}: caddy is not on PATH, not validated")
    try:
        result = subprocess.run(  # noqa: S603 - our argv, the operator's own file
            [caddy, "validate", "--adapter", "caddyfile", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("caddyfile", "fail", f"{path}: {_error(exc)}")
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if "Error" in ln]
        reason = (lines[-1] if lines else "invalid")[:300]
        return Check("caddyfile", "fail", f"{path}: {reason}")
    return Check("caddyfile", "ok", f"{path}: valid")


async def _run_async(settings: Settings) -> list[Check]:
    postgres, redis_check, ollama = await asyncio.gather(
        check_postgres(settings.database_url),
        check_redis(settings.redis_url),
        check_backends(settings),
    )
    return [*postgres, redis_check, *ollama]


def run_checks(caddyfile: Path | None = None) -> list[Check]:
    """Every check against this environment."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        checks = [Check("settings", "fail", str(exc))]
        checks += [
            Check(name, "skip", "settings invalid")
            for name in ("secret", "postgres", "migrations", "redis", "ollama")
        ]
    else:
        checks = [Check("settings", "ok", "NZ_* settings valid"), check_secret(settings)]
        checks += asyncio.run(_run_async(settings))
    checks.append(check_caddyfile(caddyfile))
    return checks


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    caddyfile: Annotated[
        Path | None,
        typer.Option(
            "--caddyfile",
            help="Caddyfile to validate (default ./caddy/Caddyfile, else the packaged one).",
        ),
    ] = None,
) -> None:
    """Check settings, secret, Postgres, migrations, Redis, each Ollama backend, the Caddyfile."""
    checks = run_checks(caddyfile)
    ok = all(c.status != "fail" for c in checks)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            typer.echo(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
    if not ok:
        raise typer.Exit(1)
