"""Signed identity tokens for proxy tests (what the auth service would hand to Caddy)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx

from neuronetz_gateway.domain.identity import (
    IDENTITY_HEADER,
    Allowance,
    Identity,
    Limits,
    OptionCaps,
    sign_identity,
)
from tests.conftest import TEST_SECRET

__all__ = [
    "IDENTITY_HEADER",
    "ROUTE_BY_PATH",
    "identity_for",
    "identity_hook",
    "route_of",
    "signed",
]

ROUTE_BY_PATH = {
    "/api/generate": "generate",
    "/api/chat": "chat",
    "/api/embed": "embed",
    "/api/embeddings": "embeddings",
    "/api/show": "show",
    "/api/tags": "tags",
    "/api/ps": "ps",
    "/api/version": "version",
    "/api/key": "key",
    "/v1/chat/completions": "v1.chat.completions",
    "/v1/completions": "v1.completions",
    "/v1/embeddings": "v1.embeddings",
    "/v1/models": "v1.models",
    "/v1/key": "v1.key",
    "/v1/responses": "v1.responses",
    "/v1/messages": "v1.messages",
    "/v1/messages/count_tokens": "v1.messages.count_tokens",
}


def route_of(path: str) -> str:
    """The route id of a proxied path."""
    path = path.rstrip("/")
    if path.startswith("/v1/models/"):
        return "v1.model"
    return ROUTE_BY_PATH[path]


def identity_for(route: str, **fields: Any) -> Identity:
    """An identity for ``route``; tenant 1 / key 1 and a fresh request id unless given."""
    values: dict[str, Any] = {
        "request_id": "req-" + secrets.token_hex(8),
        "tenant_id": 1,
        "tenant_name": "acme",
        "key_id": 1,
        "key_prefix": "nz_test0001",
        "route": route,
        "expires_at_ms": int(time.time() * 1000) + 30_000,
    }
    values.update(fields)
    return Identity(**values)


def signed(route: str, secret: str = TEST_SECRET, **fields: Any) -> str:
    """A signed identity token for ``route``."""
    return sign_identity(identity_for(route, **fields), secret.encode())


def identity_hook(sent: list[str] | None = None, **fields: Any) -> Callable[[httpx.Request], None]:
    """An httpx request hook signing a fresh identity for each request's route.

    The official clients take it as ``event_hooks={"request": [hook]}``: each
    request carries an ``X-NZ-Identity`` for its own route, as Caddy would add.
    The request ids used are appended to ``sent``.
    """

    def hook(request: httpx.Request) -> None:
        identity = identity_for(route_of(request.url.path), **fields)
        request.headers[IDENTITY_HEADER] = sign_identity(identity, TEST_SECRET.encode())
        if sent is not None:
            sent.append(identity.request_id)

    return hook


__all__ += ["Allowance", "Limits", "OptionCaps"]
