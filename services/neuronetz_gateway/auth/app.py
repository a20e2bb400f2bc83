"""The auth service's app factory: Litestar, served by Granian (``serve auth``).

``create_app(settings, *, store=..., redis=..., ...)`` takes its
collaborators, so tests pass real or fake ones and production passes none:
what is not given is opened in the lifespan (asyncpg pool, Redis client) and
closed there; what is given belongs to the caller. ``create_app_from_env()``
is what Granian runs as a factory in each worker.

Routes: ``GET /authorize`` (a plain ASGI handler: no signature parsing, no
DTO, prebuilt headers), ``/healthz``, ``/readyz`` (Redis and Postgres answer),
``/metrics`` (Prometheus). ``/authorize`` is answered before Litestar's
router (:class:`~neuronetz_gateway.fast_paths.FastPathLitestar`): routing,
its middleware and scope state cost a decision about as much CPU as the
decision's own Python, and none of it is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from litestar import Litestar, Response, get
from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.ledger_census import CompleteLedger
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_commands import command_channel
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.auth import responses
from neuronetz_gateway.auth.authorize import Authorizer, DecisionRequest
from neuronetz_gateway.auth.key_cache import LocalKeyCache, RedisKeyCache
from neuronetz_gateway.auth.key_verifier import KeyVerifier
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.auth.revocation import KeyEventListener
from neuronetz_gateway.fast_paths import FastPathLitestar
from neuronetz_gateway.logging import configure_logging, get_logger
from neuronetz_gateway.settings import Settings, load_settings
from neuronetz_gateway.startup_heap import freeze_startup_heap
from neuronetz_gateway.tracing import TRACEPARENT_HEADER, Tracing, tracing_from_env

__all__ = [
    "AuthService",
    "create_app",
    "create_app_from_env",
    "freeze_startup_heap",
    "open_shared_redis",
]

log = get_logger("neuronetz_gateway.auth")

_READY_TIMEOUT_SECONDS = 1.0
_LISTENER_STARTUP_WAIT_SECONDS = 2.0
_REDIS_MAX_CONNECTIONS = 64


class AuthService:
    """The collaborators of one app instance, wired in its lifespan (also on ``app.state``)."""

    def __init__(self, settings: Settings, metrics: AuthMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store: Store | None = None
        self.redis: RedisClient | None = None
        self.verifier: KeyVerifier | None = None
        self.authorizer: Authorizer | None = None
        self.listener: KeyEventListener | None = None


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    redis: RedisClient | None = None,
    hasher: KeyHasher | None = None,
    limiter: Limiter | None = None,
    metrics: AuthMetrics | None = None,
    clock: Callable[[], float] = time.time,
    listen: bool = True,
    tracing: Tracing | None = None,
) -> Litestar:
    """The auth app; collaborators not given are opened (and closed) by the app itself.

    ``tracing`` (None: off) belongs to the caller, who shuts it down.
    """
    service = AuthService(settings, metrics or AuthMetrics())

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await _wire(service, stack, store, redis, hasher, limiter, clock, listen, tracing)
            app.state.auth = service
            yield

    async def decide(scope: Scope, receive: Receive, send: Send) -> None:
        request = _decision_request(scope)
        if tracing is not None:
            request.traceparent = _header(scope, _TRACEPARENT)
        authorizer = service.authorizer
        if authorizer is None:  # pragma: no cover - only before the lifespan ran
            answer = responses.unavailable("native", "-")
        else:
            answer = await authorizer.decide(request)
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        )
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    @asgi("/authorize", copy_scope=False)
    async def authorize(scope: Scope, receive: Receive, send: Send) -> None:
        await decide(scope, receive, send)

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz() -> Response[dict[str, Any]]:
        checks = await _readiness(service)
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if service.listener is not None:
            body["key_listener"] = service.listener.listening
        return Response(body, status_code=200 if ok else 503)

    @get("/metrics")
    async def metrics_endpoint() -> Response[bytes]:
        service.metrics.dependencies(**await _readiness(service))
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app = FastPathLitestar(
        route_handlers=[authorize, healthz, readyz, metrics_endpoint],
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.fast_paths = {"/authorize": decide}
    return app


async def _wire(
    service: AuthService,
    stack: AsyncExitStack,
    store: Store | None,
    redis: RedisClient | None,
    hasher: KeyHasher | None,
    limiter: Limiter | None,
    clock: Callable[[], float],
    listen: bool,
    tracing: Tracing | None,
) -> None:
    settings = service.settings
    if store is None:
        # min_size=0: a replica must start during a Postgres outage and serve the keys
        # warm in the shared Redis cache (the listener reconnects by itself)
        pool = await open_pool(settings.database_url, min_size=0, max_size=10)
        stack.push_async_callback(pool.close)
        store = Store(pool)
    if redis is None:
        redis = await open_shared_redis(
            settings.redis_url, settings.decision_timeout_seconds, settings.redis_ca_file or None
        )
        stack.push_async_callback(close_redis, redis)
    if limiter is None:
        census = command_channel(redis, settings.decision_timeout_seconds)
        stack.push_async_callback(census.aclose)
        limiter = Limiter(
            redis,
            prefix=settings.redis_prefix,
            # rebuilt budgets wait for the audit writers' unwritten rows (issue 13)
            ledger=CompleteLedger(store, census, prefix=settings.redis_prefix),
            clock=clock,
            lease_ttl_seconds=settings.lease_ttl_seconds,
            timeout_seconds=settings.decision_timeout_seconds,
        )
        stack.push_async_callback(limiter.aclose)
    remote_cache = RedisKeyCache(
        redis,
        prefix=settings.redis_prefix,
        ttl_seconds=settings.key_cache_redis_ttl_seconds,
        timeout_seconds=settings.decision_timeout_seconds,
    )
    stack.push_async_callback(remote_cache.aclose)
    verifier = KeyVerifier(
        store=store,
        hasher=hasher or KeyHasher(settings.argon2_max_concurrency),
        local=LocalKeyCache(
            ttl_seconds=settings.key_cache_ttl_seconds,
            negative_ttl_seconds=settings.negative_cache_ttl_seconds,
        ),
        remote=remote_cache,
        secret=settings.gateway_secret.encode(),
        previous_secret=settings.previous_secret(),
        metrics=service.metrics,
        clock=clock,
    )
    stack.push_async_callback(verifier.aclose)
    service.store, service.redis, service.verifier = store, redis, verifier
    service.authorizer = Authorizer(
        verifier=verifier,
        limiter=limiter,
        secret=settings.gateway_secret.encode(),
        metrics=service.metrics,
        identity_ttl_seconds=settings.identity_ttl_seconds,
        timeout_seconds=settings.decision_timeout_seconds,
        clock=clock,
        tracing=tracing,
    )
    if listen:
        listener = KeyEventListener(
            settings.database_url,
            on_event=verifier.evict_local,
            on_event_async=verifier.evict_remote,
            on_gap=verifier.flush,
            on_state=_set_use_local(verifier),
            metrics=service.metrics,
        )
        await listener.start()
        stack.push_async_callback(listener.stop)
        service.listener = listener
        # not required (the local cache is simply bypassed until then), but
        # starting warm avoids a Redis round trip on the first requests
        await listener.wait_listening(_LISTENER_STARTUP_WAIT_SECONDS)


async def open_shared_redis(
    url: str, timeout_seconds: float, ca_file: str | None = None
) -> RedisClient:
    """A Redis client for many concurrent decisions: callers queue for a connection.

    redis-py's default pool raises "Too many connections" at once when its
    100 connections are busy, which would turn a load burst into 503s; a
    blocking pool makes the extra callers wait (within the decision timeout).
    No retry loops: a failing Redis must fail the decision fast (503).
    """
    return await open_redis(
        url,
        timeout_seconds=timeout_seconds,
        ca_file=ca_file,
        max_connections=_REDIS_MAX_CONNECTIONS,
    )


def _set_use_local(verifier: KeyVerifier) -> Callable[[bool], None]:
    def set_state(listening: bool) -> None:
        verifier.use_local = listening

    return set_state


_TRACEPARENT = TRACEPARENT_HEADER.encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _decision_request(scope: Scope) -> DecisionRequest:
    """Pick the few headers the decision needs out of the raw ASGI headers."""
    method = uri = authorization = api_key = client_id = None
    duplicated = False
    for name, value in scope["headers"]:
        if name == b"x-forwarded-uri":
            duplicated = duplicated or uri is not None
            uri = value.decode("latin-1")
        elif name == b"x-forwarded-method":
            duplicated = duplicated or method is not None
            method = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
        elif name == b"x-request-id":
            client_id = value.decode("latin-1")
    if duplicated:  # two answers to "which request?": refuse to guess
        method = uri = None
    return DecisionRequest(method, uri, authorization, api_key, client_id)


async def _readiness(service: AuthService) -> dict[str, bool]:
    async def redis_ok() -> bool:
        if service.redis is None:
            return False
        try:
            async with asyncio.timeout(_READY_TIMEOUT_SECONDS):
                return bool(await service.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def postgres_ok() -> bool:
        if service.store is None:
            return False
        try:
            async with asyncio.timeout(_READY_TIMEOUT_SECONDS):
                return bool(await service.store.pool.fetchval("SELECT 1") == 1)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    redis_ready, postgres_ready = await asyncio.gather(redis_ok(), postgres_ok())
    return {"redis": redis_ready, "postgres": postgres_ready}


def create_app_from_env() -> Litestar:
    """Granian's factory: settings from ``NZ_*`` (validated), logging, then the app."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    tracing = tracing_from_env("auth")
    app = create_app(settings, tracing=tracing)
    if tracing is not None:
        app.on_shutdown.append(tracing.shutdown)
    app.on_startup.append(freeze_startup_heap)  # after the lifespan wired everything
    return app
