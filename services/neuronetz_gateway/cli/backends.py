"""``neuronetz-gateway backend add|list|drain|enable|remove``: the Ollama servers of the fleet.

Backends live in Postgres; every change notifies ``nz_backend_events``, so
every proxy replica has it within a second. ``list`` adds what the proxies
last saw of each backend (health, installed and loaded models), read from
the status they share in Redis (:mod:`neuronetz_gateway.adapters.backend_board`);
when Redis cannot be asked those columns are ``null`` and a note says why.
With no backend defined, ``NZ_OLLAMA_URL`` (``NZ_OLLAMA_SLOTS``) is the one
backend, listed as ``default`` with ``"source": "environment"``.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from neuronetz_gateway.adapters.postgres.store import BackendRecord, Store
from neuronetz_gateway.cli.common import fail, iso, print_json, run_with_store
from neuronetz_gateway.domain.backend_status import BackendStatus
from neuronetz_gateway.domain.backends import DEFAULT_BACKEND, BackendSpec, BackendState
from neuronetz_gateway.domain.errors import GatewayError
from neuronetz_gateway.settings import SettingsError, load_settings

__all__ = ["backend_app"]

backend_app = typer.Typer(
    help="The Ollama servers behind the gateway (each change reaches every proxy within 1 s).",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Option("--name", help="Backend name (unique), e.g. gpu1.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_REDIS_TIMEOUT = 2.0


def _spec_json(spec: BackendSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "url": spec.url,
        "slots": spec.slots,
        "weight": spec.weight,
        "state": spec.state.value,
    }


def _record_json(record: BackendRecord) -> dict[str, Any]:
    return {
        **_spec_json(record.spec),
        "source": "database",
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
    }


@backend_app.command("add")
def add(
    name: Name,
    url: Annotated[str, typer.Option("--url", help="Ollama base URL, http://host:11434.")],
    slots: Annotated[
        int, typer.Option("--slots", help="Requests it runs at once (its OLLAMA_NUM_PARALLEL).")
    ],
    weight: Annotated[int, typer.Option("--weight", help="Routing weight (default 1).")] = 1,
    as_json: AsJson = False,
) -> None:
    """Add a backend; it takes traffic as soon as it answers its health check."""
    try:
        spec = BackendSpec.checked(name, url, slots, weight)
    except GatewayError as exc:
        fail(str(exc))
    record = run_with_store(lambda store: store.add_backend(spec))
    if as_json:
        print_json(_record_json(record))
    else:
        typer.echo(f"added backend {record.spec.name} ({record.spec.url}, {spec.slots} slots)")


def _set_state(name: str, state: BackendState, as_json: bool, verb: str) -> None:
    record = run_with_store(lambda store: store.set_backend_state(name, state))
    if as_json:
        print_json(_record_json(record))
    else:
        typer.echo(f"{verb} backend {record.spec.name}")


@backend_app.command("drain")
def drain(name: Name, as_json: AsJson = False) -> None:
    """Take no new requests on it; its running ones finish."""
    _set_state(name, BackendState.DRAINING, as_json, "draining")


@backend_app.command("enable")
def enable(name: Name, as_json: AsJson = False) -> None:
    """Take new requests on it again (after ``drain``)."""
    _set_state(name, BackendState.ACTIVE, as_json, "enabled")


@backend_app.command("remove")
def remove(name: Name, as_json: AsJson = False) -> None:
    """Remove a backend (drain it first to let its running requests finish)."""
    record = run_with_store(lambda store: store.remove_backend(name))
    if as_json:
        print_json(_record_json(record))
    else:
        typer.echo(f"removed backend {record.spec.name}")


def _environment_backend() -> dict[str, Any]:
    """``NZ_OLLAMA_URL`` as the one backend, when the operator defined none."""
    url = os.environ.get("NZ_OLLAMA_URL") or "http://127.0.0.1:11434"
    slots_raw = os.environ.get("NZ_OLLAMA_SLOTS") or "4"
    try:
        slots = int(slots_raw)
    except ValueError:
        fail(f"NZ_OLLAMA_SLOTS must be a number, got {slots_raw!r}")
    return {
        **_spec_json(BackendSpec(DEFAULT_BACKEND, url.rstrip("/"), slots)),
        "source": "environment",
        "created_at": None,
        "updated_at": None,
    }


class _Shared:
    """What the proxies share in Redis about the backends."""

    def __init__(self) -> None:
        self.statuses: dict[str, BackendStatus] = {}
        self.slots: dict[str, tuple[int, int]] = {}  # name -> (held, queued)
        self.note: str | None = None


async def _shared(slots: dict[str, int]) -> _Shared:
    """Statuses (discovery) and slot counts (admission) of the backends ``name -> slots``."""
    shared = _Shared()
    shared.statuses, shared.note = await _statuses(list(slots), shared, slots)
    return shared


async def _statuses(
    names: list[str], shared: _Shared, capacity: dict[str, int]
) -> tuple[dict[str, BackendStatus], str | None]:
    """What the proxies share in Redis, or a note saying why it is not known."""
    # imported here: redis costs every other command of the CLI its import time
    from neuronetz_gateway.adapters.backend_board import BackendBoard, BoardUnavailable
    from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
    from neuronetz_gateway.adapters.redis_slots import SlotAdmission

    env = dict(os.environ)
    env.setdefault("NZ_GATEWAY_SECRET", "unused-by-backend-list")  # not needed to read statuses
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        return {}, f"health unknown: {exc}"
    try:
        client = await open_redis(
            settings.redis_url,
            timeout_seconds=_REDIS_TIMEOUT,
            ca_file=settings.redis_ca_file or None,
        )
    except Exception as exc:  # noqa: BLE001 - any failure only hides the health columns
        return {}, f"health unknown: redis unavailable ({type(exc).__name__})"
    try:
        board = BackendBoard(client, prefix=settings.redis_prefix)
        statuses = await board.read(names)
    except BoardUnavailable as exc:
        await close_redis(client)
        return {}, f"health unknown: redis unavailable ({exc})"
    admission = SlotAdmission(client, prefix=settings.redis_prefix, timeout_seconds=_REDIS_TIMEOUT)
    try:
        for name in names:
            state = await admission.state(name, capacity=capacity[name])
            shared.slots[name] = (state.held, state.queued)
    except Exception as exc:  # noqa: BLE001 - only the slot columns stay unknown
        typer.echo(f"note: slots unknown ({type(exc).__name__})", err=True)
    finally:
        await admission.aclose()
        await close_redis(client)
    return statuses, None


def _with_status(
    row: dict[str, Any], status: BackendStatus | None, known: bool, slots: tuple[int, int] | None
) -> dict[str, Any]:
    health = "unknown" if status is None else ("healthy" if status.reachable else "unhealthy")
    return {
        **row,
        "health": health if known else None,
        "error": status.error if status else None,
        "checked_at": iso(datetime.fromtimestamp(status.checked_at, UTC)) if status else None,
        "installed": list(status.installed) if status else None,
        "loaded": list(status.loaded) if status else None,
        # slot admission's leases and fair queue in Redis (adapters/redis_slots.py)
        "in_flight": slots[0] if slots else None,
        "queued": slots[1] if slots else None,
    }


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


@backend_app.command("list")
def list_backends(as_json: AsJson = False) -> None:
    """The backends with their state, health, installed and loaded models."""

    async def work(store: Store) -> list[BackendRecord]:
        return await store.list_backends()

    records = run_with_store(work)
    rows = [_record_json(r) for r in records] or [_environment_backend()]
    shared = asyncio.run(_shared({r["name"]: r["slots"] for r in rows}))
    note = shared.note
    listed = [
        _with_status(r, shared.statuses.get(r["name"]), note is None, shared.slots.get(r["name"]))
        for r in rows
    ]
    if note:
        typer.echo(f"note: {note}", err=True)
    if as_json:
        print_json(listed)
        return
    now = time.time()
    for r in listed:
        loaded = ",".join(r["loaded"]) if r["loaded"] else "-"
        installed = len(r["installed"]) if r["installed"] is not None else "-"
        checked = "-"
        if r["checked_at"]:
            age = now - datetime.fromisoformat(r["checked_at"]).timestamp()
            checked = f"{age:.0f}s ago"
        typer.echo(
            f"{r['name']:<16} {r['url']:<32} {r['state']:<8} slots {r['slots']:<4}"
            f" weight {r['weight']:<4} {r['health'] or 'unknown':<9} models {installed}"
            f" loaded {loaded} in_flight {_or_dash(r['in_flight'])} queued {_or_dash(r['queued'])}"
            f" checked {checked}"
        )
