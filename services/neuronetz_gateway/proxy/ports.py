"""What the proxy's steps need from outside, as small ports (``typing.Protocol``).

The pipeline (``proxy/pipeline.py``) and the codecs depend on these, never on
a concrete adapter; the composition root (``proxy/app.py``) plugs the real
ones in and unit tests plug in fakes (``tests/unit/fakes.py``).

- :class:`Upstream`: forward a native Ollama request, get a streaming answer;
- :class:`TokenLimiter`: single use of the identity, reservation, settlement,
  the concurrency lease (Redis in production);
- :class:`ModelCatalogue`: which models are installed (``/api/tags``, cached);
- :class:`AuditSink`: where the audit and prompt rows go (queued, never blocking);
- :class:`Clock`: wall-clock seconds (``time.time``).

The errors a port raises are part of its contract and are re-exported here:
:class:`UpstreamError` (and its :class:`UpstreamTimeout`),
:class:`LimiterUnavailable` and :class:`IdentityReplayed`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from neuronetz_gateway.adapters.ollama_client import (
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from neuronetz_gateway.adapters.redis_limiter import IdentityReplayed, LimiterUnavailable
from neuronetz_gateway.domain.accounting import AuditRow, PromptRow
from neuronetz_gateway.domain.identity import Allowance, Limits
from neuronetz_gateway.domain.limits import Decision
from neuronetz_gateway.domain.model_call import ModelCall

if TYPE_CHECKING:
    from neuronetz_gateway.proxy.discovery import Catalogue

__all__ = [
    "AuditSink",
    "Clock",
    "IdentityReplayed",
    "LimiterUnavailable",
    "ModelCall",
    "ModelCatalogue",
    "TokenLimiter",
    "Upstream",
    "UpstreamError",
    "UpstreamStream",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class UpstreamStream(Protocol):
    """One answer from a backend, its headers in, its body still to be read.

    The caller reads the body either whole (:meth:`read`) or as it arrives
    (:meth:`chunks`, one network read per item, never re-chunked: native
    streams are relayed byte for byte), and always ends with exactly one of
    :meth:`release` (body consumed; the connection may be reused) or
    :meth:`abort` (close now, so Ollama stops generating). Calling
    :meth:`abort` after :meth:`release`, or twice, is harmless. Reads raise
    :class:`UpstreamError` (:class:`UpstreamTimeout` for a read timeout).
    """

    @property
    def status(self) -> int:
        """The backend's HTTP status."""
        ...

    @property
    def content_type(self) -> str:
        """The backend's ``content-type`` (``application/json`` when it sent none)."""
        ...

    @property
    def backend(self) -> str:
        """The backend that answered, as ``scheme://host:port`` (no credentials)."""
        ...

    async def read(self) -> bytes:
        """The whole body."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...

    def release(self) -> None:
        """Done with a fully read body."""
        ...

    def abort(self) -> None:
        """Close the connection now."""
        ...


class Upstream(Protocol):
    """Where model calls go: today one Ollama (``NZ_OLLAMA_URL``), later a pool.

    :meth:`open` sends ``body`` (``None``: a ``GET``, else a ``POST`` of JSON)
    to Ollama's fixed native ``path`` (``/api/chat``, ``/api/generate``,
    ``/api/embed``, ``/api/embeddings``, ``/api/show``, ``/api/ps``,
    ``/api/version``) and returns as soon as the answer's headers are in.
    The pipeline has already checked the model, applied the key's caps,
    reserved the tokens and claimed the identity; the body is final.

    For whoever implements a backend pool behind this port (SPEC section 12):

    - choose the backend from the call: ``call.model`` (canonical name, or
      ``None`` for a call that is not for one model: ``/api/ps``,
      ``/api/version``, any healthy backend will do), ``call.tenant_id``
      (fair queueing), ``call.session`` (a client's session hint, for
      sticking a session to a backend), ``call.stream``;
    - admission (slot leases, the fair queue and its timeout) happens inside
      :meth:`open`; a pool that cannot admit raises :class:`UpstreamError`
      (mapped to 502 today; a dedicated "queue timed out" error with a
      ``Retry-After`` is for the pool to add, beside this contract);
    - failover is allowed only before the first byte reached the caller,
      that is inside :meth:`open` (a refused connection, a 5xx before any
      body); once :meth:`open` returned, the stream is the client's;
    - the slot is held until the stream's :meth:`UpstreamStream.release` or
      :meth:`UpstreamStream.abort`, which the pipeline always calls (also
      for a client that left, a revoked key, a cancelled task); ``abort``
      must be synchronous and safe to call twice;
    - :meth:`open` may be cancelled (a revocation cancels the wait for
      headers): it must then give back whatever it took;
    - send ``call.request_id`` as ``x-request-id`` and ``call.traceparent``
      (when set) as ``traceparent``; never any client header.
    - ``UpstreamStream.backend`` names the backend that answered (spans,
      metrics), as ``scheme://host:port`` without credentials.

    :meth:`ping` is the readiness probe: whether a backend answers at all.
    """

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> UpstreamStream:
        """Send to ``path``; the answer once its headers arrived (raises UpstreamError)."""
        ...

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        """Whether the upstream answers within ``limit_seconds``; never raises."""
        ...


class TokenLimiter(Protocol):
    """The Redis side of one request: single use, reservation, settlement, the lease.

    Every method raises :class:`LimiterUnavailable` when it cannot be asked
    (the proxy fails closed: 503), :meth:`claim_identity` and
    :meth:`reserve` also :class:`IdentityReplayed` for an identity used before.
    """

    async def claim_identity(
        self, *, tenant_id: int, request_id: str, expires_at_ms: int
    ) -> None: ...

    async def reserve(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
        tokens: int,
        single_use_until_ms: int | None = None,
    ) -> Decision: ...

    async def settle(
        self,
        *,
        tenant_id: int,
        key_id: int,
        reserved: int,
        actual: int,
        reserved_at: float,
        key_limits: Limits | None = None,
        tenant_limits: Limits | None = None,
        release_lease_id: str | None = None,
        reservation_id: str | None = None,
        audited_at: float | None = None,
    ) -> Allowance: ...

    async def renew_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None: ...

    async def release_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None: ...

    async def ping(self) -> bool: ...


class ModelCatalogue(Protocol):
    """The installed models; :meth:`catalogue` raises ``DiscoveryFailed`` when unknown."""

    async def catalogue(self) -> Catalogue: ...

    def forget(self) -> None:
        """Drop what is cached (an upstream said a listed model is missing)."""
        ...


class AuditSink(Protocol):
    """Where finished requests are recorded; :meth:`submit` never blocks and never fails."""

    def submit(self, row: AuditRow | PromptRow) -> None: ...


class Clock(Protocol):
    """Wall-clock seconds since the epoch (``time.time``)."""

    def __call__(self) -> float: ...
