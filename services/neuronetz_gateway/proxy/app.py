"""The streaming proxy's app factory (Litestar, served by Granian).

``create_app(settings, ...)`` takes its collaborators as optional arguments
(tests may pass their own); the missing ones are opened in the lifespan:
the asyncpg pool (``min_size=0``, so the proxy starts and serves while
Postgres is down: audit rows spool), the Redis client, the one upstream
session, the audit writer, the prompt-log purge task and the LISTEN
connection that ends a revoked key's running requests. Granian runs
:func:`create_app_from_env` in every worker (``neuronetz-gateway serve proxy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.backend_board import BackendBoard
from neuronetz_gateway.adapters.backend_check import HttpBackendChecker
from neuronetz_gateway.adapters.backend_directory import BackendDirectory, environment_backend
from neuronetz_gateway.adapters.ledger_census import CompleteLedger, LedgerBeacon
from neuronetz_gateway.adapters.ollama_client import OllamaClient, OllamaUpstream
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_commands import RedisCommands, command_channel
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.adapters.redis_slots import SlotAdmission
from neuronetz_gateway.adapters.tenant_weights import TenantWeights
from neuronetz_gateway.domain.circuit_breaker import Outcome
from neuronetz_gateway.domain.dialect import error_body
from neuronetz_gateway.domain.ledger_census import spool_namespace
from neuronetz_gateway.fast_paths import FastPathLitestar
from neuronetz_gateway.logging import configure_logging, get_logger
from neuronetz_gateway.proxy.context import ProxyContext
from neuronetz_gateway.proxy.discovery import ModelDiscovery
from neuronetz_gateway.proxy.fleet_discovery import FleetDiscovery
from neuronetz_gateway.proxy.metrics import DEFAULT_BACKEND, ProxyMetrics
from neuronetz_gateway.proxy.pool import (
    BackendPool,
    DiscoveredFleet,
    FleetCatalogue,
    FleetUpstream,
    PoolMetrics,
)
from neuronetz_gateway.proxy.revocation import RevocationWatch
from neuronetz_gateway.proxy.routes import (
    drain_finishing,
    proxied_fast_paths,
    proxied_route_handlers,
)
from neuronetz_gateway.proxy.settle_retry import SettleRetries
from neuronetz_gateway.settings import Settings, load_settings
from neuronetz_gateway.startup_heap import freeze_startup_heap
from neuronetz_gateway.stopping import stop_task, wait_set
from neuronetz_gateway.tracing import Tracing, tracing_from_env

__all__ = ["create_app", "create_app_from_env"]

log = get_logger(__name__)

_PROBE_TIMEOUT = 2.0
#: How long a shutdown waits for requests' accounting still running (then logs what is left).
_DRAIN_SECONDS = 5.0


async def _purge_prompts(store: Store, interval: float, stopping: asyncio.Event) -> None:
    """Delete expired prompt logs every ``interval`` seconds (errors: try next time)."""
    while not stopping.is_set():
        try:
            deleted = await store.purge_prompts(datetime.now(UTC))
            if deleted:
                log.info("prompt_logs_purged", deleted=deleted)
        except Exception as exc:  # noqa: BLE001 - Postgres may be away; the next round retries
            log.warning("prompt_purge_failed", reason=type(exc).__name__)
        await wait_set(stopping, interval)


def create_app(
    settings: Settings,
    *,
    pool: asyncpg.Pool | None = None,
    redis: Any = None,
    ollama: OllamaClient | None = None,
    tracing: Tracing | None = None,
) -> Litestar:
    """The proxy app; collaborators not given are opened (and closed) by its lifespan.

    ``tracing`` (None: off) belongs to the caller, who shuts it down.
    """
    metrics = ProxyMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            db = pool
            if db is None:
                db = await open_pool(settings.database_url, min_size=0, max_size=10)
                stack.push_async_callback(db.close)
            client = redis
            if client is None:
                client = await open_redis(
                    settings.redis_url,
                    timeout_seconds=settings.decision_timeout_seconds,
                    ca_file=settings.redis_ca_file or None,
                )
                stack.push_async_callback(close_redis, client)
            upstream = ollama
            if upstream is None:
                upstream = OllamaClient(
                    settings.ollama_url,
                    connect_timeout=settings.upstream_connect_timeout_seconds,
                    read_timeout=settings.upstream_read_timeout_seconds,
                )
            await upstream.open()
            stack.push_async_callback(upstream.close)
            store = Store(db)
            audit, census = await _open_audit(settings, db, client, stack)
            metrics.watch_audit(lambda: audit.queue_depth, lambda: audit.files_on_disk)
            limiter = Limiter(
                client,
                prefix=settings.redis_prefix,
                ledger=CompleteLedger(store, census, prefix=settings.redis_prefix),
                lease_ttl_seconds=settings.lease_ttl_seconds,
                timeout_seconds=settings.decision_timeout_seconds,
                reservation_ttl_seconds=settings.reservation_ttl_seconds,
            )
            stack.push_async_callback(limiter.aclose)
            settle_retries = _settle_retries(limiter, settings, metrics, stack)
            single_discovery = ModelDiscovery(
                upstream,
                client,
                redis_key=f"{settings.redis_prefix}:models",
                ttl_seconds=settings.discovery_ttl_seconds,
            )
            fleet_upstream, fleet_catalogue = await _open_fleet(
                settings, store, client, metrics, stack, OllamaUpstream(upstream), single_discovery
            )
            app.state.proxy = ProxyContext(
                settings=settings,
                secret=settings.gateway_secret.encode(),
                previous_secret=settings.previous_secret(),
                upstream=fleet_upstream,
                limiter=limiter,
                discovery=fleet_catalogue,
                audit=audit,
                metrics=metrics,
                tracing=tracing,
                settle_retries=settle_retries,
            )
            app.state.store = store
            # a revoked key's running requests end within a second, on every replica
            watch = RevocationWatch(
                settings.database_url, app.state.proxy.running, store.revoked_keys, metrics
            )
            await watch.start()
            stack.push_async_callback(watch.stop)
            purging = asyncio.Event()  # set: stop (the loop checks it; see ``stopping``)
            purge = asyncio.create_task(
                _purge_prompts(store, settings.prompt_purge_interval_seconds, purging),
                name="prompt-purge",
            )
            try:
                yield
            finally:  # before the stack closes the audit writer and the limiter
                await _wind_down(settle_retries, purging, purge)

    @get("/healthz", media_type=MediaType.JSON, sync_to_thread=False)
    def healthz() -> dict[str, str]:
        """Alive."""
        return {"status": "ok"}

    @get("/readyz", media_type=MediaType.JSON)
    async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Redis, Postgres and Ollama all answer; 503 otherwise."""
        checks = await _probe(request)
        ready = all(checks.values())
        return Response(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    @get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8")
    async def metrics_endpoint(request: Request[Any, Any, Any]) -> bytes:
        """Prometheus text format; Redis, Postgres and Ollama are probed for the ``*_up`` gauges."""
        checks = await _probe(request)
        metrics.probed(
            redis=checks["redis"],
            postgres=checks["postgres"],
            backends={DEFAULT_BACKEND: checks["ollama"]},
        )
        return metrics.render()

    app = FastPathLitestar(
        route_handlers=[*proxied_route_handlers(), healthz, readyz, metrics_endpoint],
        lifespan=[lifespan],
        exception_handlers={HTTPException: _dialect_error, Exception: _internal_error},
        openapi_config=None,
    )
    app.fast_paths = proxied_fast_paths()
    return app


async def _wind_down(
    settle_retries: SettleRetries, purging: asyncio.Event, purge: asyncio.Task[None]
) -> None:
    """Shutdown: the purge stopped, the accounting still running given ``_DRAIN_SECONDS``.

    Requests' finishes still running (cancelled ones', and those settling after
    their answer went out: rows queued before the writer stops, failed settles
    handed to retries still alive), then settlements being retried (what is
    left is given up, logged).
    """
    purging.set()
    deadline = time.monotonic() + _DRAIN_SECONDS
    await drain_finishing(within=_DRAIN_SECONDS)
    left = deadline - time.monotonic()
    if settle_retries.pending and left > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await settle_retries.wait()
    await stop_task(purge, within=5.0)


def _settle_retries(
    limiter: Limiter, settings: Settings, metrics: ProxyMetrics, stack: contextlib.AsyncExitStack
) -> SettleRetries:
    """Failed settlements retried in the background, stopped before the limiter closes."""
    retries = SettleRetries(
        limiter,
        reservation_ttl_seconds=settings.reservation_ttl_seconds,
        on_outcome=lambda outcome: metrics.child(metrics.settle_retries, outcome).inc(),
    )
    stack.push_async_callback(retries.aclose)
    return retries


async def _probe(request: Request[Any, Any, Any]) -> dict[str, bool]:
    """Whether Redis, Postgres and Ollama answer (readiness and the ``*_up`` gauges)."""
    ctx: ProxyContext = request.app.state.proxy
    store: Store = request.app.state.store
    redis_ok, postgres_ok, ollama_ok = await asyncio.gather(
        ctx.limiter.ping(), _postgres_ok(store), ctx.upstream.ping(_PROBE_TIMEOUT)
    )
    return {"redis": redis_ok, "postgres": postgres_ok, "ollama": ollama_ok}


async def _postgres_ok(store: Store) -> bool:
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            return bool(await store.pool.fetchval("SELECT 1") == 1)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def _dialect_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """404 / 405 and friends from the router, in the dialect of the path."""
    status = exc.status_code
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
    message = {404: "not found", 405: "method not allowed"}.get(status, str(exc.detail))
    body = error_body(request.url.path, status, code, message)
    return Response(body, status_code=status, media_type=MediaType.JSON)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("proxy_internal_error", path=request.url.path, error=type(exc).__name__)
    body = error_body(request.url.path, 500, "internal_error", "internal error")
    return Response(body, status_code=HTTP_500_INTERNAL_SERVER_ERROR, media_type=MediaType.JSON)


def create_app_from_env() -> Litestar:
    """What Granian calls in each worker: settings from ``NZ_*``, logging, the app."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing = tracing_from_env("proxy")
    app = create_app(settings, tracing=tracing)
    if tracing is not None:
        app.on_shutdown.append(tracing.shutdown)
    app.on_startup.append(freeze_startup_heap)  # after the lifespan wired everything
    return app


async def _open_fleet(
    settings: Settings,
    store: Store,
    client: Any,
    metrics: ProxyMetrics,
    stack: contextlib.AsyncExitStack,
    single: OllamaUpstream,
    single_discovery: ModelDiscovery,
) -> tuple[FleetUpstream, FleetCatalogue]:
    """The operator's backends behind the Upstream port (SPEC section 12), closed by ``stack``.

    The backend directory (rows, live within a second) decides per call:
    with backends defined, the pool (routing, Redis slots, failover) over
    per-backend discovery; with none, ``single`` and ``single_discovery``
    exactly as before, unless ``NZ_OLLAMA_SLOTS`` is set: then ``NZ_OLLAMA_URL``
    is the pool's one backend ``default`` (its slots admitted, the fair queue,
    its checks). Per-backend checks run while the pool serves.
    """
    slotted_fallback = settings.ollama_slots is not None
    directory = BackendDirectory(
        store.backend_specs,
        environment_backend(settings.ollama_url, settings.fallback_slots),
        database_url=settings.database_url,
    )
    checker = HttpBackendChecker(timeout_seconds=settings.upstream_connect_timeout_seconds)
    await checker.open()
    stack.push_async_callback(checker.close)
    discovery = FleetDiscovery(
        directory,
        checker,
        BackendBoard(client, prefix=settings.redis_prefix),
        interval_seconds=settings.backend_check_interval_seconds,
    )
    slots = SlotAdmission(
        client,
        prefix=settings.redis_prefix,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        timeout_seconds=settings.decision_timeout_seconds,
    )
    stack.push_async_callback(slots.aclose)
    weights = TenantWeights(store.pool)
    await weights.start()
    stack.push_async_callback(weights.stop)
    pool = BackendPool(
        DiscoveredFleet(discovery, Outcome),
        slots,
        metrics=PoolMetrics(metrics.registry),
        queue_timeout_seconds=settings.queue_timeout_seconds,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        connect_timeout=settings.upstream_connect_timeout_seconds,
        read_timeout=settings.upstream_read_timeout_seconds,
        tenant_weight=weights,
        # a poll may be an interval old where it is read and another where it was taken
        residency_horizon_seconds=2 * settings.backend_check_interval_seconds + 1.0,
    )
    stack.push_async_callback(pool.aclose)  # before the slots close: it gives back what it holds
    checking = False

    async def follow_directory() -> None:
        """Per-backend checks run while the pool serves (else no extra probes)."""
        nonlocal checking
        pooled = directory.from_database or slotted_fallback
        if pooled and not checking:
            checking = True
            await discovery.start()
        elif not pooled and checking:
            checking = False
            await discovery.stop()

    def changed(_: object) -> None:
        task = asyncio.ensure_future(follow_directory())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    directory.on_change(changed)
    await directory.start()
    stack.push_async_callback(directory.stop)
    await follow_directory()
    stack.push_async_callback(discovery.stop)
    use_fleet = lambda: directory.from_database or slotted_fallback  # noqa: E731 - per call
    return (
        FleetUpstream(single, pool, use_fleet),
        FleetCatalogue(single_discovery, discovery, use_fleet),
    )


async def _open_audit(
    settings: Settings, db: asyncpg.Pool, client: Any, stack: contextlib.AsyncExitStack
) -> tuple[AuditWriter, RedisCommands]:
    """The audit writer, and its beacon in the ledger census (closed by ``stack``).

    Returns the writer and the census's command channel (the limiter's
    ledger reads the census over it before a budget rebuild).
    """
    audit = AuditWriter(
        db,
        settings.audit_spool_dir,
        batch_size=settings.audit_batch_size,
        flush_interval=settings.audit_flush_interval_seconds,
        # one directory per deployment: a row is never replayed into another database
        namespace=spool_namespace(settings.database_url, settings.redis_prefix),
    )
    await audit.start()
    stack.push_async_callback(audit.stop)  # runs before the pool closes
    census = command_channel(client, settings.decision_timeout_seconds)
    stack.push_async_callback(census.aclose)
    beacon = LedgerBeacon(census, prefix=settings.redis_prefix, writer=audit)
    await beacon.start()

    async def retire() -> None:
        # the writer's last flush first, so the beacon's last word is the truth
        await audit.stop()
        await beacon.stop()

    stack.push_async_callback(retire)  # runs first: before the census channel closes
    return audit, census
