"""One proxied request's bookkeeping: model check, reservation, settlement, audit.

An :class:`Exchange` is created once the identity has verified. Before
anything goes upstream or back to the client the identity is used up
(:meth:`Exchange.claim`, inside the reservation's own Redis call when there
is one): each signed identity serves one request, on any replica, and a
replay raises :class:`IdentityReplayed` (the caller answers 401 and does no
accounting, so a replay neither releases the first request's lease nor
writes an audit row under its request id). Whatever happens afterwards
(a refusal, an upstream failure, a client that leaves),
:meth:`Exchange.finish` runs exactly once: it settles the reservation to the
real count, releases the concurrency lease, queues the audit row (and the
prompt row for keys that opted in), counts the metrics and writes the one
log line. None of it carries prompt text except the opted-in prompt row.

Who writes it: ``proxy/routes.serve`` opens and finishes it, the pipeline's
steps (``proxy/pipeline.py`` and its relay, ``proxy/relay.py``) advance it;
codecs never touch it (they get the request and return bytes and counts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from neuronetz_gateway.domain.accounting import AuditRow, PromptRow
from neuronetz_gateway.domain.dialect import Surface
from neuronetz_gateway.domain.identity import Allowance, Identity, Limits
from neuronetz_gateway.domain.limits import ratelimit_header_pairs
from neuronetz_gateway.domain.model_call import ModelCall
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.logging import get_logger, info_line
from neuronetz_gateway.proxy.asgi import Headers, Send, send_response
from neuronetz_gateway.proxy.context import ProxyContext
from neuronetz_gateway.proxy.discovery import Catalogue, DiscoveryFailed
from neuronetz_gateway.proxy.metrics import DEFAULT_BACKEND
from neuronetz_gateway.proxy.ports import IdentityReplayed, LimiterUnavailable, UpstreamStream
from neuronetz_gateway.proxy.refusals import Refusal, model_unavailable
from neuronetz_gateway.proxy.settle_retry import PendingSettle
from neuronetz_gateway.proxy.spans import backend_address, span_attributes, span_name
from neuronetz_gateway.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span

__all__ = ["REVOKED_MESSAGE", "Exchange", "IdentityReplayed", "counts_tokens"]

log = get_logger("neuronetz_gateway.proxy")

#: The mid-stream error (and 401 message) of a request whose key was revoked while it ran.
REVOKED_MESSAGE = "the API key was revoked"
#: Without a retention the operator chose, opted-in prompt logs live this long.
DEFAULT_PROMPT_TTL_DAYS = 30
_TOKEN_FIELDS = (
    "limit_tokens",
    "remaining_tokens",
    "remaining_daily_tokens",
    "remaining_monthly_tokens",
    "remaining_total_tokens",
    "reset_tokens_ms",
)


def _counts(limits: Limits) -> bool:
    return any(
        v is not None
        for v in (limits.tpm, limits.daily_tokens, limits.monthly_tokens, limits.total_tokens)
    )


def counts_tokens(identity: Identity) -> bool:
    """Whether any token limit or budget applies (else reserve/settle are skipped)."""
    return _counts(identity.key_limits) or _counts(identity.tenant_limits)


def _merge_tokens(base: Allowance, update: Allowance) -> Allowance:
    """``base`` with the token values ``update`` knows (requests stay as admitted)."""
    changes = {f: v for f in _TOKEN_FIELDS if (v := getattr(update, f)) is not None}
    return msgspec.structs.replace(base, **changes) if changes else base


def _limits_unavailable() -> Refusal:
    return Refusal(
        503,
        "service_unavailable",
        "limits cannot be checked right now; try again shortly",
        retry_after=1,
    )


class Exchange:
    """The state of one request from verified identity to audit row."""

    __slots__ = (
        "allowance",
        "audited_at",
        "backend",
        "canonical",
        "claimed",
        "completion_tokens",
        "ctx",
        "disconnected",
        "estimated",
        "identity",
        "model",
        "prompt_estimate",
        "prompt_text",
        "prompt_tokens",
        "reservation_id",
        "reserved",
        "reserved_at",
        "responded",
        "response_text",
        "revoked",
        "route",
        "session",
        "settled",
        "span",
        "started",
        "status",
        "streamed",
        "surface",
        "traceparent",
        "ts",
        "ttfb_ms",
        "unsettled",
        "upstream",
        "upstream_error",
        "upstream_wait",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        identity: Identity,
        route: str,
        surface: Surface,
        session: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.identity = identity
        self.route = route
        self.surface = surface
        self.session = session  # the client's session hint, for the upstream's choice
        self.started = time.perf_counter()
        self.ts = datetime.fromtimestamp(ctx.clock(), UTC)
        self.allowance = identity.allowance
        self.model: str | None = None
        self.canonical: str | None = None
        self.prompt_estimate = 0
        self.reserved = 0
        self.reserved_at = 0.0
        self.reservation_id: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.estimated = False
        self.streamed = False
        self.disconnected = False
        self.settled = False
        self.audited_at: float | None = None  # when the audit row was queued (unix s)
        self.unsettled: PendingSettle | None = None  # a settle Redis did not take
        self.responded = False
        self.claimed = False
        self.revoked = False
        self.upstream: UpstreamStream | None = None
        self.upstream_wait: asyncio.Future[Any] | None = None
        self.status = 500
        self.ttfb_ms: int | None = None
        self.backend: str | None = None  # the backend the request went to, once sent
        self.upstream_error: str | None = None
        self.prompt_text: str | None = None
        self.response_text: str | None = None
        self.span: Span | None = None
        self.traceparent: str | None = None  # sent on to Ollama when tracing is on

    def start_span(self, tracing: Tracing) -> None:
        """This request's span, the child of auth's (its context came signed)."""
        self.span = tracing.start(f"proxy {self.route}", self.identity.traceparent)
        self.traceparent = tracing.traceparent(self.span)

    def model_call(
        self, *, stream: bool = False, on_queued: Callable[[], None] | None = None
    ) -> ModelCall:
        """What the upstream is told about this call (to choose a backend); it names the
        backend it sends to through ``on_sent`` (:meth:`to_backend`)."""
        identity = self.identity
        return ModelCall(
            route=self.route,
            surface=self.surface,
            tenant_id=identity.tenant_id,
            key_id=identity.key_id,
            request_id=identity.request_id,
            model=self.canonical,
            session=self.session,
            stream=stream,
            traceparent=self.traceparent,
            on_queued=on_queued,
            on_sent=self.to_backend,
        )

    # -- headers ----------------------------------------------------------------

    def headers(self, content_type: bytes) -> Headers:
        """Response headers: content type, request id and the ``x-ratelimit-*`` values."""
        headers: Headers = [
            (b"content-type", content_type),
            (b"x-request-id", self.identity.request_id.encode()),
        ]
        headers += ratelimit_header_pairs(self.allowance)
        return headers

    async def respond(self, send: Send, status: int, body: bytes, content_type: bytes) -> None:
        """A complete response with this exchange's headers (the identity claimed first)."""
        await self.claim()
        self.status = status
        self.responded = True
        await send_response(send, status, body, self.headers(content_type))

    def mark_first_byte(self) -> None:
        """Record the time to first byte (once)."""
        if self.ttfb_ms is None:
            elapsed = time.perf_counter() - self.started
            self.ttfb_ms = int(elapsed * 1000)
            self.ctx.metrics.child(self.ctx.metrics.ttfb, self.route).observe(elapsed)
            if self.backend is not None:
                self.ctx.metrics.child(self.ctx.metrics.backend_ttft, self.backend).observe(elapsed)

    def to_backend(self, backend: str = DEFAULT_BACKEND) -> None:
        """The request goes to ``backend`` now: it is in flight there until :meth:`finish`
        (the upstream's ``ModelCall.on_sent``; a failover moves it to the next one)."""
        if self.backend == backend:
            return
        metrics = self.ctx.metrics
        in_flight = metrics.backend_in_flight
        if self.backend is not None:
            metrics.child(in_flight, self.backend).dec()
        self.backend = backend
        metrics.child(in_flight, backend).inc()

    # -- models -------------------------------------------------------------------

    async def catalogue(self) -> Catalogue:
        """The installed models; 503 when Ollama cannot say (fail closed)."""
        try:
            return await self.ctx.discovery.catalogue()
        except DiscoveryFailed:
            self.ctx.metrics.child(self.ctx.metrics.upstream_errors, "discovery").inc()
            raise Refusal(
                503,
                "service_unavailable",
                "the model list is unavailable; try again shortly",
                retry_after=1,
            ) from None

    async def check_model(self, model: str) -> str:
        """The canonical name of an allowed, installed model, else the one identical refusal."""
        self.model = model[:200]
        canonical = canonical_model(model)
        if not canonical:
            raise model_unavailable(model, self.surface)
        catalogue = await self.catalogue()
        allowed = self.identity.models
        if canonical not in catalogue.entries or (allowed is not None and canonical not in allowed):
            raise model_unavailable(model, self.surface)
        self.canonical = canonical
        return canonical

    # -- revocation -------------------------------------------------------------------

    def revoke(self) -> None:
        """The key was revoked while this ran: close the upstream (Ollama stops generating).

        The relay in charge sees :attr:`revoked` and ends the answer with the
        surface's error; a request that has not gone upstream yet never will.
        """
        self.revoked = True
        if self.upstream is not None:
            self.upstream.abort()
        if self.upstream_wait is not None:
            self.upstream_wait.cancel()

    def end_replayed(self) -> None:
        """A replay: off the running list, its span ended as the 401 it is; nothing else."""
        self.ctx.running.discard(self)
        self.ctx.metrics.identity_replays.inc()
        if self.span is not None:
            Tracing.finish(self.span, {"nz.identity.replayed": True}, status_code=401)
            self.span = None

    def revoked_refusal(self) -> Refusal:
        """What a revoked request is answered when nothing was sent yet."""
        self.status = 401
        return Refusal(401, "invalid_api_key", REVOKED_MESSAGE)

    # -- single use -------------------------------------------------------------------

    async def claim(self) -> None:
        """Use the identity up (once); :class:`IdentityReplayed` if it was used before.

        A no-op after a reservation, which claimed it in the same script.
        Redis unreachable: 503, as for every limit that cannot be checked.
        """
        if self.claimed:
            return
        identity = self.identity
        try:
            await self.ctx.limiter.claim_identity(
                tenant_id=identity.tenant_id,
                request_id=identity.request_id,
                expires_at_ms=identity.expires_at_ms,
            )
        except LimiterUnavailable:
            raise _limits_unavailable() from None
        self.claimed = True

    # -- tokens -----------------------------------------------------------------------

    async def reserve(self, prompt_estimate: int, tokens: int) -> None:
        """Reserve the request's maximum on both levels, or refuse (429 / 503)."""
        self.prompt_estimate = prompt_estimate
        identity = self.identity
        if tokens <= 0 or not counts_tokens(identity):
            return
        reserved_at = self.ctx.clock()
        try:
            decision = await self.ctx.limiter.reserve(
                tenant_id=identity.tenant_id,
                key_id=identity.key_id,
                key_limits=identity.key_limits,
                tenant_limits=identity.tenant_limits,
                request_id=identity.request_id,
                tokens=tokens,
                single_use_until_ms=None if self.claimed else identity.expires_at_ms,
            )
        except LimiterUnavailable:
            raise _limits_unavailable() from None
        self.claimed = True  # by the script, refused or not
        self.allowance = _merge_tokens(self.allowance, decision.allowance)
        if not decision.allowed:
            code = decision.error_code or "rate_limit_exceeded"
            what = "token budget" if code == "budget_exceeded" else "token rate limit"
            raise Refusal(
                429,
                code,
                f"{what} exceeded ({decision.reason}, {decision.level}); this request could "
                f"use up to {tokens} tokens",
                retry_after=decision.retry_after,
                limit=decision.reason,
                should_retry=False if code == "budget_exceeded" else None,
            )
        self.reserved = tokens
        self.reserved_at = reserved_at
        self.reservation_id = decision.reservation_id

    def charge(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The real counts, from Ollama's final chunk or body."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.estimated = False

    def charge_estimate(self, completion_chunks: int) -> None:
        """A cut-off or count-less answer: the prompt estimate plus one token per chunk."""
        self.prompt_tokens = self.prompt_estimate
        self.completion_tokens = completion_chunks
        self.estimated = True

    async def settle(self) -> None:
        """Correct the reservation to the charged count and release the lease (once).

        One round trip does both (the answer is complete by now: non-streamed
        bodies are in hand, streams have ended). Before the response starts,
        the remaining allowance is read back for its headers; after it, nobody
        would see it, so Redis is not asked for it.
        """
        if self.settled:
            return
        self.settled = True
        identity = self.identity
        lease_id = identity.lease_id
        if not self.reserved:
            if lease_id is not None:
                try:
                    await self.ctx.limiter.release_lease(
                        tenant_id=identity.tenant_id, key_id=identity.key_id, lease_id=lease_id
                    )
                except LimiterUnavailable:
                    log.warning("lease_release_failed", request_id=identity.request_id)
            return
        headers_pending = not self.responded
        try:
            allowance = await self.ctx.limiter.settle(
                tenant_id=identity.tenant_id,
                key_id=identity.key_id,
                reserved=self.reserved,
                actual=self.prompt_tokens + self.completion_tokens,
                reserved_at=self.reserved_at,
                key_limits=identity.key_limits if headers_pending else None,
                tenant_limits=identity.tenant_limits if headers_pending else None,
                release_lease_id=lease_id,
                reservation_id=self.reservation_id,
                audited_at=self.audited_at,
            )
        except (LimiterUnavailable, asyncio.CancelledError) as exc:
            # Left alone, the reservation would expire and be given back: the real
            # charge lost. Sent again in the background (the response does not wait),
            # until it lands or the reservation expired; the lease goes with it.
            # Handed to the retries once the audit row is queued (finish), so that a
            # retry landing after a rebuild from a ledger holding the row knows it.
            # A cancel that cut the round trip half-way too (idempotent per reservation
            # id: one that did land is not charged twice); the cancel then goes on.
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "cancelled" if cancelled else str(exc)
            log.warning("settle_failed", request_id=identity.request_id, reason=reason)
            self.unsettled = PendingSettle(
                request_id=identity.request_id,
                tenant_id=identity.tenant_id,
                key_id=identity.key_id,
                reserved=self.reserved,
                actual=self.prompt_tokens + self.completion_tokens,
                reserved_at=self.reserved_at,
                release_lease_id=lease_id,
                reservation_id=self.reservation_id,
            )
            if cancelled:
                raise
            return
        if headers_pending:
            self.allowance = _merge_tokens(self.allowance, allowance)

    # -- the end ------------------------------------------------------------------------

    async def _claim_late(self) -> tuple[bool, asyncio.CancelledError | None]:
        """The claim of an exchange that ended before it: (replayed, the cancel that cut it).

        Redis away, or a cancel: nothing was granted, the row is still written
        (a replay's second row is dropped by its request id).
        """
        try:
            await self.claim()
        except IdentityReplayed:
            return True, None
        except Refusal:
            pass
        except asyncio.CancelledError as exc:
            return False, exc
        return False, None

    async def finish(self) -> None:
        """Queue the audit row, settle, release the lease, count and log (exactly once).

        An exchange that ended before claiming its identity (a refusal, a
        client that left) claims it now: a replay does no accounting at all.
        """
        identity = self.identity
        ctx = self.ctx
        ctx.running.discard(self)
        # A cancel (the request's task, mid-round-trip) does not cut the accounting
        # short: the row is still queued and a cut settle handed to the retries; it
        # is raised again once the rest is done (nothing after the settle awaits).
        replayed, cancelled = await self._claim_late() if not self.claimed else (False, None)
        if replayed:
            self.end_replayed()
            return
        # The row is queued (and so journaled) before the settle's round trip: a
        # proxy killed during it still has the answer the client got in its ledger.
        duration_ms = int((time.perf_counter() - self.started) * 1000)
        model = self.canonical or self.model
        row = AuditRow(
            request_id=identity.request_id,
            ts=self.ts,
            tenant_id=identity.tenant_id,
            key_id=identity.key_id,
            key_prefix=identity.key_prefix,
            route=self.route,
            model=model,
            status=self.status,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttfb_ms=self.ttfb_ms,
            duration_ms=duration_ms,
            streamed=self.streamed,
            client_disconnected=self.disconnected,
            estimated=self.estimated,
            revoked=self.revoked,
        )
        ctx.audit.submit(row)
        self.audited_at = time.time()
        if identity.log_prompts and self.prompt_text is not None:
            days = identity.prompt_ttl_days or DEFAULT_PROMPT_TTL_DAYS
            ctx.audit.submit(
                PromptRow(
                    request_id=identity.request_id,
                    tenant_id=identity.tenant_id,
                    key_id=identity.key_id,
                    created_at=self.ts,
                    expires_at=self.ts + timedelta(days=days),
                    request_text=self.prompt_text,
                    response_text=self.response_text or "",
                )
            )
        try:
            await self.settle()
        except asyncio.CancelledError as exc:
            cancelled = exc  # the cut settle is in self.unsettled: retried
        if self.unsettled is not None and ctx.settle_retries is not None:
            ctx.settle_retries.retry(replace(self.unsettled, audited_at=self.audited_at))
        if self.span is not None:
            self.span.update_name(span_name(self.route, model))
            attributes = span_attributes(
                row,
                surface=self.surface,
                backend=backend_address(self.upstream.backend) if self.upstream else None,
                tenant=identity.tenant_name,
            )
            Tracing.finish(self.span, attributes, status_code=self.status)
        metrics = ctx.metrics
        metrics.child(metrics.requests, self.route, str(self.status)).inc()
        metrics.child(metrics.request_seconds, self.route).observe(duration_ms / 1000)
        if self.backend is not None:
            metrics.child(metrics.backend_in_flight, self.backend).dec()
        for kind, count in (("prompt", self.prompt_tokens), ("completion", self.completion_tokens)):
            if count:
                metrics.child(metrics.tokens, kind).inc(count)
                metrics.child(metrics.tenant_tokens, identity.tenant_name, model or "-", kind).inc(
                    count
                )
                if self.backend is not None:
                    metrics.child(metrics.backend_tokens, self.backend, kind).inc(count)
        if self.disconnected:
            metrics.client_disconnects.inc()
        # the canonical line: the audit row (no prompt text in it) and what only the log has
        fields = msgspec.structs.asdict(row)
        fields["tenant"] = identity.tenant_name
        fields["upstream_error"] = self.upstream_error
        info_line(log, "proxy_request", fields)
        if cancelled is not None:
            raise cancelled
