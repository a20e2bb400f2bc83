"""Typed settings from ``NZ_*`` environment variables, validated once at start-up.

Every entry point calls :func:`load_settings`; a wrong value raises
:class:`SettingsError` naming the variable. Secrets are wrapped in
:class:`Secret` so they never appear in a ``repr`` or a log line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from neuronetz_gateway.domain.backends import MAX_SLOTS
from neuronetz_gateway.domain.redis_urls import SENTINEL_SCHEMES, parse_sentinel_url

__all__ = ["Secret", "Settings", "SettingsError", "load_settings"]


#: The slots ``NZ_OLLAMA_URL`` is listed with when ``NZ_OLLAMA_SLOTS`` is unset.
DEFAULT_OLLAMA_SLOTS = 4


class SettingsError(ValueError):
    """A configuration variable is missing or invalid; the message names it."""


class Secret:
    """A string that does not show itself in ``repr``/``str``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def encode(self) -> bytes:
        return self._value.encode()

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/neuronetz"


def _env(name: str) -> str:
    return "NZ_" + name.upper()


def default_spool_dir(environ: Mapping[str, str] | None = None) -> str:
    """Where audit rows wait while Postgres is down, unless ``NZ_AUDIT_SPOOL_DIR`` says.

    ``/var/lib/neuronetz-gateway/spool`` for root (and in the images); for
    anyone else the user's state directory, so the proxy starts without root.
    """
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return "/var/lib/neuronetz-gateway/spool"
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "neuronetz-gateway", "spool")


@dataclass(frozen=True, slots=True)
class Settings:
    """All configuration, one struct; env name = ``NZ_`` + field name upper-cased."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = "redis://127.0.0.1:6379/0"
    ollama_url: str = "http://127.0.0.1:11434"
    # the slots (requests at once, Ollama's OLLAMA_NUM_PARALLEL) of NZ_OLLAMA_URL when it
    # is the one backend, i.e. when `backend add` defined none. Unset: no slot admission
    # there (Ollama queues by itself; listed as 4); set: the fleet's admission and queue
    ollama_slots: int | None = None
    gateway_secret: Secret = field(default_factory=lambda: Secret(""))
    # the secret being rotated out: still accepted for identities and key
    # fingerprints, never used for anything new (empty = none)
    gateway_secret_previous: Secret = field(default_factory=lambda: Secret(""))
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    redis_prefix: str = "nz"  # namespace for every Redis key (one per deployment)
    redis_ca_file: str = ""  # CA bundle for rediss:// (empty: the system's CAs)
    # auth
    key_cache_ttl_seconds: float = 5.0
    negative_cache_ttl_seconds: float = 60.0
    argon2_max_concurrency: int = 2
    identity_ttl_seconds: int = 5  # forward_auth hands it on at once; single use anyway
    lease_ttl_seconds: int = 60
    decision_timeout_seconds: float = 1.5
    # proxy
    max_body_bytes: int = 8 * 1024 * 1024
    default_max_tokens: int = 2048
    # the keep_alive window of a key that may not override it (shorter unloads a
    # shared model, longer pins it)
    keep_alive_min_seconds: float = 60.0
    keep_alive_max_seconds: float = 86400.0
    upstream_connect_timeout_seconds: float = 5.0
    upstream_read_timeout_seconds: float = 600.0
    # how long a proxy's unsettled token reservation holds budget (SPEC section 5): the
    # longest a request may wait and then hear nothing from Ollama, i.e. the queue (30),
    # connect (5) and read (600) timeouts plus a minute. A stream running longer is still
    # charged in full when it settles; only its reservation stops holding budget early.
    reservation_ttl_seconds: float = 695.0
    discovery_ttl_seconds: float = 10.0
    # how often each backend's /api/tags and /api/ps are checked (once per round across
    # the replicas); a status nobody renewed for 3 rounds is gone
    backend_check_interval_seconds: float = 3.0
    # a fleet (SPEC section 12): how long a request waits in a backend's fair queue for a
    # slot before it gets 503 with Retry-After (long before Ollama's own queue would)
    queue_timeout_seconds: float = 30.0
    # a streamed request still queued after this long gets its response started (200,
    # SSE headers) and a keep-alive frame this often until its slot comes (not native)
    queue_ping_seconds: float = 3.0
    audit_spool_dir: str = field(default_factory=default_spool_dir)
    audit_batch_size: int = 200
    audit_flush_interval_seconds: float = 0.5
    shutdown_grace_seconds: float = 30.0
    prompt_purge_interval_seconds: float = 3600.0
    # auth: how long a verified key stays in the Redis cache shared by the replicas
    key_cache_redis_ttl_seconds: float = 300.0

    @property
    def fallback_slots(self) -> int:
        """The slots ``NZ_OLLAMA_URL`` is listed (and, if set, admitted) with."""
        return DEFAULT_OLLAMA_SLOTS if self.ollama_slots is None else self.ollama_slots

    def previous_secret(self) -> bytes | None:
        """``NZ_GATEWAY_SECRET_PREVIOUS`` as bytes, or ``None`` when unset."""
        value = self.gateway_secret_previous.get()
        return value.encode() if value.strip() else None

    def __post_init__(self) -> None:
        _check_url("database_url", self.database_url, ("postgresql", "postgres"))
        _check_url(
            "redis_url",
            self.redis_url,
            ("redis", "rediss", "unix", *SENTINEL_SCHEMES),
        )
        if urlsplit(self.redis_url).scheme in SENTINEL_SCHEMES:
            try:
                parse_sentinel_url(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"{_env('redis_url')}: {exc}") from None
        if self.redis_ca_file and not os.path.isfile(self.redis_ca_file):
            raise SettingsError(
                f"{_env('redis_ca_file')}={self.redis_ca_file!r} is not a readable file"
            )
        _check_url("ollama_url", self.ollama_url, ("http", "https"))
        if not self.gateway_secret.get().strip():
            raise SettingsError(
                f"{_env('gateway_secret')} must be set (e.g. to the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise SettingsError(f"{_env('log_level')} must be debug, info, warning or error")
        if self.log_format not in {"auto", "json", "console"}:
            raise SettingsError(f"{_env('log_format')} must be auto, json or console")
        if self.keep_alive_min_seconds > self.keep_alive_max_seconds:
            raise SettingsError(
                f"{_env('keep_alive_min_seconds')} must not exceed {_env('keep_alive_max_seconds')}"
            )
        if self.ollama_slots is not None and self.ollama_slots > MAX_SLOTS:
            raise SettingsError(f"{_env('ollama_slots')} must be at most {MAX_SLOTS}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise SettingsError(f"{_env(f.name)} must be positive, got {value!r}")


def _check_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise SettingsError(
            f"{_env(name)} must be a URL with scheme {' or '.join(schemes)}, got {value!r}"
        )


RECOMMENDED_SECRET_LENGTH = 32


def secret_warnings(settings: Settings) -> list[str]:
    """Advice an entry point prints at start-up (a short secret still works)."""
    warnings = []
    if len(settings.gateway_secret.get()) < RECOMMENDED_SECRET_LENGTH:
        warnings.append(
            f"{_env('gateway_secret')} is shorter than {RECOMMENDED_SECRET_LENGTH} characters: "
            "use a long random value in production"
        )
    if settings.gateway_secret_previous == settings.gateway_secret:
        warnings.append(
            f"{_env('gateway_secret_previous')} equals {_env('gateway_secret')}: "
            "nothing is being rotated"
        )
    return warnings


def check_spool_dir(path: str) -> None:
    """Create the spool directory if needed and prove it writable, or name the variable."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        raise SettingsError(
            f"{_env('audit_spool_dir')}={path!r} is not a writable directory ({exc.strerror}); "
            "audit rows wait there while Postgres is down"
        ) from None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment (``NZ_*``) plus explicit overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = _env(f.name)
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        values[f.name] = _coerce(name, f.type, raw)
    for name in ("gateway_secret", "gateway_secret_previous"):
        if isinstance(values.get(name), str):
            values[name] = Secret(values[name])
    return Settings(**values)


def _coerce(name: str, annotation: Any, raw: str) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if kind == "Secret":
        return Secret(raw)
    return raw


def load_database_url(environ: Mapping[str, str] | None = None) -> str:
    """``NZ_DATABASE_URL`` alone, validated (the operator CLI needs nothing else)."""
    env = os.environ if environ is None else environ
    url = env.get("NZ_DATABASE_URL") or DEFAULT_DATABASE_URL
    _check_url("database_url", url, ("postgresql", "postgres"))
    return url


def load_gateway_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """``NZ_GATEWAY_SECRET`` alone, or ``None`` (the CLI fingerprints new keys with it)."""
    env = os.environ if environ is None else environ
    value = env.get(_env("gateway_secret"), "")
    return value.encode() if value.strip() else None


__all__ += [
    "check_spool_dir",
    "default_spool_dir",
    "load_database_url",
    "load_gateway_secret",
    "secret_warnings",
]
