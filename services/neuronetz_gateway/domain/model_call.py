"""One call to a model, whatever surface it came in on. Pure.

Every request the proxy sends upstream is described by a :class:`ModelCall`:
the pipeline (``proxy/pipeline.py``) fills it in step by step, and the
upstream port (``proxy/ports.py``) reads it to choose a backend. It carries
no prompt text: what goes to Ollama is the body the surface's codec encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from neuronetz_gateway.domain.dialect import Surface

__all__ = ["SESSION_HEADERS", "ModelCall", "session_hint"]

#: Request headers whose value names a client session (Claude Code's, Codex's and
#: other agents'), read as a hint for sending one session to one backend.
SESSION_HEADERS = (b"x-claude-code-session-id", b"session-id")
_MAX_SESSION = 200


def session_hint(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first session header's value (ASGI raw headers), cut to 200 characters."""
    for name, value in headers:
        if name in SESSION_HEADERS and value:
            return bytes(value[:_MAX_SESSION]).decode("latin-1")
    return None


@dataclass(slots=True)
class ModelCall:
    """What one upstream call is: who asks, for which model, on which route.

    ``model`` is the canonical name once the model check passed, ``None`` for
    calls that are not for one model (``/api/ps``, ``/api/version``).
    ``session`` is a client's session hint (a header from
    :data:`SESSION_HEADERS`, cut to 200 characters), ``None`` without one.
    ``on_queued`` is called by an upstream that has to make the call wait for
    a backend's slot (again if a failover waits once more); never when a slot
    is free at once. ``on_sent`` is called with the backend's name (as the
    metrics label it) as the call goes out to it, again on a failover.
    """

    route: str
    surface: Surface
    tenant_id: int
    key_id: int
    request_id: str
    model: str | None = None
    session: str | None = None
    stream: bool = False
    traceparent: str | None = None  # W3C trace context sent on to Ollama when tracing is on
    on_queued: Callable[[], None] | None = None
    on_sent: Callable[[str], None] | None = None
