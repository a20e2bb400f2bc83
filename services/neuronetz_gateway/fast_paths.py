"""Litestar with a few exact paths answered as plain ASGI, ahead of its router.

Both services' hot paths (auth's ``/authorize``, the proxy's model routes)
cost less than Litestar's routing, middleware and per-request scope state
would add to them. Requests for exactly those paths go straight to their
handler; everything else (lifespan, health, metrics, path variants such as
``/authorize/``, unknown paths and their 404s) goes through Litestar, where
the same handlers are registered too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from litestar import Litestar

__all__ = ["AsgiCall", "FastPathLitestar"]

AsgiCall = Callable[[Any, Any, Any], Awaitable[None]]


class FastPathLitestar(Litestar):
    """Dispatches ``fast_paths`` (exact path -> ASGI callable) before Litestar's router."""

    #: replaced (never mutated) by the app factory once its handlers exist
    fast_paths: Mapping[str, AsgiCall] = MappingProxyType({})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            fast = self.fast_paths.get(scope["path"])
            if fast is not None:
                scope["app"] = self
                await fast(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
