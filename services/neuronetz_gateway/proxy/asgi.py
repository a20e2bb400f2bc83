"""Raw ASGI plumbing for the proxy's hot path: headers, bounded body reads, responses.

The proxied routes are Litestar ``asgi`` handlers: Litestar routes them and
runs the lifespan, but the request and response bytes go straight through
these helpers, so a streamed chunk costs one ``send`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = [
    "DRAIN_BYTES",
    "BodyTooLarge",
    "Headers",
    "Receive",
    "Scope",
    "Send",
    "end_body",
    "read_body",
    "request_header",
    "send_body",
    "send_response",
    "start_response",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


def request_header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), decoded as latin-1."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


#: Past the limit, at most this much more of a body is read (and dropped) before the 413.
DRAIN_BYTES = 64 * 1024 * 1024


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a refused body (at most ``budget`` bytes).

    Answering while the client is still sending makes the server close a
    connection with unread bytes: the peer (Caddy) then sees a reset instead
    of the 413 and answers 502/503 itself, or the client sees a broken pipe.
    Reading the rest first lets the 413 arrive. Caddy's own body limit (and its
    ``read_body`` timeout) bound what there is to read.
    """
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, at most ``limit`` bytes (:class:`BodyTooLarge` past it).

    ``None`` when the client left before sending it all. A body past the limit
    (declared by ``content-length`` or found while reading) is drained, not
    kept, before :class:`BodyTooLarge` is raised (see :func:`_drain`).
    """
    declared = request_header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(receive, DRAIN_BYTES)
        raise BodyTooLarge
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise BodyTooLarge
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body"):
                await _drain(receive, DRAIN_BYTES)
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def start_response(send: Send, status: int, headers: Headers) -> None:
    """Send the status line and headers (the body follows with :func:`send_body`)."""
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_body(send: Send, data: bytes) -> None:
    """Send one piece of a streamed body, at once."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def end_body(send: Send, data: bytes = b"") -> None:
    """Send the last piece of the body."""
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def send_response(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A complete response with a ``content-length``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
