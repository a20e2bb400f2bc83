"""``GET /v1/key`` and ``GET /api/key``: the presenting key's limits and what is left of them.

Auth read the state in its decision round trip and signed it into the
identity; this renders it (:mod:`neuronetz_gateway.domain.key_info`) without
asking Ollama anything, and Redis only to use the identity up (single use).
"""

from __future__ import annotations

from neuronetz_gateway.domain.key_info import render_key_info
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.refusals import Refusal

__all__ = ["key_info"]

_JSON = b"application/json"


async def key_info(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer from the signed state; an identity without one cannot be answered (503)."""
    state = ex.identity.key_state
    if state is None:  # an auth replica that predates the route signed it
        raise Refusal(
            503,
            "service_unavailable",
            "the key's state is unavailable; try again shortly",
            retry_after=1,
        )
    await ex.respond(send, 200, render_key_info(ex.identity, state), _JSON)
