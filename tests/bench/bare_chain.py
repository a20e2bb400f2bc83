"""The yardstick: the bare shape of this architecture, with none of the gateway's features.

Caddy (the repository's ``caddy/Caddyfile``, unchanged) calls ``forward_auth``
on a minimal auth app and ``reverse_proxy`` to a minimal passthrough proxy,
both served exactly as ``neuronetz-gateway serve`` serves ours
(:func:`~neuronetz_gateway.cli.serve.granian_options`):

- auth (:func:`create_auth_app`): one Redis ``GET`` (the process's
  :class:`~neuronetz_gateway.adapters.redis_pipeline.PipelinedRedis`, as the
  limiter uses) and a 200 with one header, ``X-NZ-Identity``, whose value it
  read; no key check, no limits, no signature;
- proxy (:func:`create_proxy_app`): the request body read, sent on with the
  gateway's own upstream client
  (:class:`~neuronetz_gateway.adapters.ollama_client.OllamaClient`) to the same
  path upstream, the answer relayed chunk by chunk as it arrives; no identity
  check, no translation, no accounting, no audit.

So "full gateway ÷ bare chain" is what every feature together costs over two
Caddy hops and two Python services. Plain ASGI callables: our hot paths skip
Litestar's router too (:class:`~neuronetz_gateway.fast_paths.FastPathLitestar`).
:func:`create_auth_rsgi` is the same auth on Granian's RSGI interface, to
price the interface itself.

Run: ``python -m tests.bench.bare_chain auth|proxy|auth-rsgi --port P`` with
``NZ_BARE_REDIS_URL`` (auth) or ``NZ_BARE_UPSTREAM`` (proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from neuronetz_gateway.adapters.ollama_client import OllamaClient
from neuronetz_gateway.adapters.redis_client import RedisClient, close_redis, open_redis
from neuronetz_gateway.adapters.redis_pipeline import PipelinedRedis

__all__ = [
    "IDENTITY_KEY",
    "create_auth_app",
    "create_auth_rsgi",
    "create_proxy_app",
    "main",
]

#: The one key the bare auth reads (set by the bench before it starts).
IDENTITY_KEY = "nzbare:identity"
_HEALTH = b'{"status":"ok"}'
_JSON = [(b"content-type", b"application/json")]

Scope = dict[str, Any]
Receive = Any
Send = Any


async def _lifespan(receive: Receive, send: Send, start: Any, stop: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Identity:
    """The one Redis read: a pipelined connection, opened once per process."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: RedisClient | None = None
        self._redis: PipelinedRedis | None = None

    async def open(self) -> None:
        self._client = await open_redis(self._url, timeout_seconds=1.0, max_connections=64)
        self._redis = PipelinedRedis.for_client(self._client, 1.0)
        if self._redis is None:
            raise RuntimeError("the bare auth needs a single Redis server")

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._client is not None:
            await close_redis(self._client)

    async def read(self) -> bytes | None:
        assert self._redis is not None
        value = await self._redis.execute("GET", IDENTITY_KEY)
        return bytes(value) if value is not None else None


def create_auth_app() -> Any:
    """ASGI: ``GET /authorize`` = one Redis ``GET``, 200 and ``X-NZ-Identity``."""
    identity = _Identity(os.environ["NZ_BARE_REDIS_URL"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, identity.open, identity.close)
            return
        if scope["path"] == "/authorize":
            value = await identity.read()
            if value is None:
                await _answer(send, 401, [], b"")
                return
            await _answer(send, 200, [(b"x-nz-identity", value)], b"")
            return
        await _answer(send, 200, _JSON, _HEALTH)  # /healthz (Caddy's health checks)

    return app


def create_auth_rsgi() -> Any:
    """The same auth on Granian's RSGI interface (the connection opens on first use)."""
    identity = _Identity(os.environ["NZ_BARE_REDIS_URL"])
    opened: asyncio.Task[None] | None = None

    class App:
        async def __rsgi__(self, scope: Any, protocol: Any) -> None:
            nonlocal opened
            if scope.path != "/authorize":
                protocol.response_bytes(200, [("content-type", "application/json")], _HEALTH)
                return
            if opened is None:
                opened = asyncio.ensure_future(identity.open())
            await opened
            value = await identity.read()
            if value is None:
                protocol.response_empty(401, [])
                return
            protocol.response_empty(200, [("x-nz-identity", value.decode("latin-1"))])

    return App()


def create_proxy_app() -> Any:
    """ASGI: every request sent on to ``NZ_BARE_UPSTREAM`` and its answer streamed back."""
    client = OllamaClient(os.environ["NZ_BARE_UPSTREAM"], connect_timeout=5.0, read_timeout=300.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, client.open, client.close)
            return
        if scope["path"] == "/healthz":
            await _answer(send, 200, _JSON, _HEALTH)
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        upstream = await client.send(scope["method"], scope["path"], bytes(body) or None)
        headers = [(b"content-type", upstream.content_type.encode("latin-1"))]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        try:
            async for chunk in upstream.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except BaseException:
            upstream.abort()
            raise
        upstream.release()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


_FACTORIES = {
    "auth": ("tests.bench.bare_chain:create_auth_app", None),
    "auth-rsgi": ("tests.bench.bare_chain:create_auth_rsgi", "rsgi"),
    "proxy": ("tests.bench.bare_chain:create_proxy_app", None),
}


def main() -> None:
    """Serve one part on 127.0.0.1 with the services' Granian settings."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bare_chain")
    parser.add_argument("part", choices=sorted(_FACTORIES))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from granian import Granian
    from granian.constants import Interfaces

    from neuronetz_gateway.cli.serve import granian_options

    target, interface = _FACTORIES[args.part]
    options = granian_options()
    if interface == "rsgi":
        options["interface"] = Interfaces.RSGI
    Granian(target, address="127.0.0.1", port=args.port, **options).serve()


if __name__ == "__main__":
    main()
