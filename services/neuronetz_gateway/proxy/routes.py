"""The proxied routes (scope-docs/SPEC.md section 3) and what serves each.

The routes are the rows of the one table, :data:`neuronetz_gateway.domain.routes.ROUTES`
(auth classifies with the same rows); each row's ``codec`` names what serves
it here (:data:`_SERVED_BY`): a model route runs the pipeline
(:mod:`neuronetz_gateway.proxy.pipeline`) with its surface's codec.
Each route is a Litestar ``asgi`` handler of a few lines. :func:`serve`
verifies the signed identity before anything else (401 otherwise, and
nothing reaches Ollama), checks that the identity was issued for this very
route, answers 401 to an identity used before (single use, see
:meth:`Exchange.claim`), runs the route's work inside an :class:`Exchange`, renders any
:class:`Refusal` in the dialect, and always finishes the exchange (settle,
lease, audit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from litestar.handlers import ASGIRouteHandler, asgi
from litestar.types import Receive as LitestarReceive
from litestar.types import Scope as LitestarScope
from litestar.types import Send as LitestarSend

from neuronetz_gateway.domain.dialect import NATIVE, Surface, error_body
from neuronetz_gateway.domain.identity import IdentityError, verify_identity
from neuronetz_gateway.domain.model_call import session_hint
from neuronetz_gateway.domain.routes import ROUTES, SURFACE_BY_ID, Route
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.proxy import anthropic, key_info, native, openai, responses
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send, request_header, send_response
from neuronetz_gateway.proxy.context import ProxyContext
from neuronetz_gateway.proxy.exchange import Exchange, IdentityReplayed
from neuronetz_gateway.proxy.native import NativeCodec
from neuronetz_gateway.proxy.pipeline import Codec, run_model_call
from neuronetz_gateway.proxy.refusals import ClientLeft, Refusal

__all__ = ["drain_finishing", "proxied_fast_paths", "proxied_route_handlers", "serve"]

log = get_logger(__name__)

RouteWork = Callable[[Exchange, Scope, Receive, Send], Awaitable[None]]

_IDENTITY = b"x-nz-identity"
#: Exchanges finishing after their request task was cancelled (kept referenced).
_finishing: set[asyncio.Future[None]] = set()
#: How many requests are between their Exchange and the end of their own ``finish``
#: (not cancelled): a server may run the lifespan's shutdown once the answers are
#: sent, before their tasks are back from the last send, or while a settle is out.
_finishing_inline = [0]
_DRAIN_POLL_SECONDS = 0.01
_JSON = b"application/json"
_UNAUTHORISED = "invalid or missing gateway identity"


async def drain_finishing(within: float) -> int:
    """Wait (at most ``within`` seconds) for requests' finishes; how many are left.

    Both kinds: a cancelled request's (in its own task) and one still settling
    in its request's task after the answer went out. The proxy's shutdown calls
    it before the audit writer and the settle retries stop: a row queued after
    that would reach no batch (it still goes to the spool, late), a settle that
    fails then would never be tried again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left_over = sum(1 for f in _finishing if not f.done()) + _finishing_inline[0]
        if not left_over:
            return 0
        left = deadline - loop.time()
        if left <= 0:
            log.warning("finishing_left", exchanges=left_over, waited_seconds=within)
            return left_over
        await asyncio.sleep(min(left, _DRAIN_POLL_SECONDS))


def _surface(route: str) -> Surface:
    return SURFACE_BY_ID.get(route, NATIVE)


async def _unauthorised(ctx: ProxyContext, route: str, send: Send) -> None:
    ctx.metrics.child(ctx.metrics.requests, route, "401").inc()
    body = error_body(_surface(route), 401, "invalid_api_key", _UNAUTHORISED)
    await send_response(send, 401, body, [(b"content-type", _JSON)])


async def _replayed(ex: Exchange, send: Send) -> None:
    """A used identity again: the same 401 as any bad one, counted, no accounting."""
    ex.end_replayed()
    log.warning("identity_replayed", request_id=ex.identity.request_id, route=ex.route)
    await _unauthorised(ex.ctx, ex.route, send)


async def _refuse(ex: Exchange, send: Send, refusal: Refusal) -> bool:
    """Send ``refusal``; ``False`` (nothing sent) when the identity turns out replayed."""
    if ex.responded:
        return True  # the answer is already on its way; the audit row records the failure
    try:
        await ex.claim()  # a refusal is an answer too: a replay gets the 401 instead
    except IdentityReplayed:
        return False
    except Refusal:
        pass  # Redis away: a refusal grants nothing, so it is still sent
    headers = ex.headers(_JSON)
    if refusal.retry_after is not None:
        headers.append((b"retry-after", str(refusal.retry_after).encode()))
    if refusal.should_retry is not None:
        headers.append((b"x-should-retry", b"true" if refusal.should_retry else b"false"))
    body = refusal.body or error_body(
        ex.surface,
        refusal.status,
        refusal.code,
        refusal.message,
        param=refusal.param,
        limit=refusal.limit,
    )
    ex.status = refusal.status
    ex.responded = True
    await send_response(send, refusal.status, body, headers)
    return True


async def serve(
    route: str, method: str, work: RouteWork, scope: Scope, receive: Receive, send: Send
) -> None:
    """Verify, run ``work`` for ``route``, answer refusals in the dialect, finish."""
    ctx: ProxyContext = scope["app"].state.proxy
    try:
        identity = verify_identity(
            request_header(scope, _IDENTITY),
            ctx.secret,
            int(ctx.clock() * 1000),
            previous_secret=ctx.previous_secret,
        )
    except IdentityError:
        await _unauthorised(ctx, route, send)
        return
    if identity.route != route:
        await _unauthorised(ctx, route, send)
        return
    ex = Exchange(ctx, identity, route, _surface(route), session_hint(scope["headers"]))
    ctx.running.add(ex)  # from here a revocation of its key ends it (Exchange.finish: off)
    # counted from here, not from its finish: the server may have the whole answer (and
    # start the lifespan's shutdown) while this task is still to come back from its last send
    _finishing_inline[0] += 1
    try:
        if ctx.tracing is not None:
            ex.start_span(ctx.tracing)
        if scope["method"] != method:
            work = _wrong_method(method)
        replayed = False
        try:
            await work(ex, scope, receive, send)
        except IdentityReplayed:
            replayed = True
        except Refusal as refusal:
            replayed = not await _refuse(ex, send, refusal)
        except ClientLeft:
            ex.disconnected = True
            ex.status = 499  # nginx's "client closed request": nobody got an answer
        except asyncio.CancelledError:
            # The server gave up on this request (client gone, shutdown): the
            # accounting must still happen, so it runs on in its own task.
            ex.disconnected = True
            task = asyncio.ensure_future(ex.finish())
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)
            raise
        except Exception:
            log.exception("proxy_failed", request_id=identity.request_id, route=route)
            replayed = not await _refuse(ex, send, Refusal(500, "internal_error", "internal error"))
        if replayed:
            await _replayed(ex, send)
            return
        await ex.finish()
    finally:
        _finishing_inline[0] -= 1


def _wrong_method(method: str) -> RouteWork:
    async def refuse(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        raise Refusal(405, "method_not_allowed", f"use {method} for this route")

    return refuse


def _handler(path: str, route: str, method: str, work: RouteWork, mount: bool) -> ASGIRouteHandler:
    async def handle(scope: LitestarScope, receive: LitestarReceive, send: LitestarSend) -> None:
        await serve(route, method, work, scope, receive, send)  # type: ignore[arg-type]

    handle.__name__ = f"proxy_{route.replace('.', '_')}"
    return asgi(path, name=route, copy_scope=False, is_mount=mount)(handle)


def _model_id(scope: Scope) -> str:
    # A mount sees the rest of the path; Litestar appends a slash to it.
    return str(scope["path"]).strip("/")


async def _v1_models(scope: Scope, receive: Receive, send: Send) -> None:
    """``/v1/models`` and ``/v1/models/{model}`` share one mount (model ids contain ``/``)."""
    model_id = _model_id(scope)
    if not model_id:
        await serve("v1.models", "GET", openai.models, scope, receive, send)
        return

    async def one(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        await openai.model(ex, scope, receive, send, model_id)

    await serve("v1.model", "GET", one, scope, receive, send)


def _model_call(codec: Codec[Any]) -> RouteWork:
    """The pipeline with ``codec``: what every model route runs."""
    return partial(run_model_call, codec)


def _native(route: Route) -> RouteWork:
    return _model_call(NativeCodec(route.id, route.upstream or route.path))


#: What serves each route of the table (``Route.codec``): a surface's codec run by the
#: pipeline, or the gateway's own answer. A new surface: its codec here and its rows there.
_SERVED_BY: dict[str, Callable[[Route], RouteWork]] = {
    "native": _native,
    "native.tags": lambda _: native.tags,
    "native.ps": lambda _: native.running_models,
    "native.version": lambda _: native.version,
    "key_info": lambda _: key_info.key_info,
    "openai.chat": lambda _: _model_call(openai.ChatCodec()),
    "openai.completions": lambda _: _model_call(openai.CompletionCodec()),
    "openai.embeddings": lambda _: _model_call(openai.EmbeddingsCodec()),
    "openai.responses": lambda _: _model_call(responses.ResponsesCodec()),
    "anthropic.messages": lambda _: _model_call(anthropic.MessagesCodec()),
    "anthropic.count_tokens": lambda _: anthropic.count_tokens,
}


def _routes() -> list[tuple[str, str, str, RouteWork]]:
    """``(path, route id, method, work)`` per exact path (``/v1/models`` is a mount)."""
    return [
        (r.path, r.id, r.method, _SERVED_BY[r.codec](r)) for r in ROUTES if r.path != "/v1/models"
    ]


def proxied_fast_paths() -> dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]:
    """The same routes by exact path, for dispatch before Litestar's router.

    Not ``/v1/models``: it is a mount (model ids contain ``/``), left to Litestar.
    """
    return {path: partial(serve, route, method, work) for path, route, method, work in _routes()}


def proxied_route_handlers() -> list[ASGIRouteHandler]:
    """One Litestar ``asgi`` handler per proxied route, each to its fixed upstream path."""
    routes = _routes()
    handlers = [_handler(path, route, method, work, False) for path, route, method, work in routes]

    async def v1_models(scope: LitestarScope, receive: LitestarReceive, send: LitestarSend) -> None:
        await _v1_models(scope, receive, send)  # type: ignore[arg-type]

    handlers.append(
        asgi("/v1/models", name="v1.models", copy_scope=False, is_mount=True)(v1_models)
    )
    return handlers
