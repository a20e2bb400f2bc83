"""The forward_auth decision: route, key, limits, signed identity. One call per request.

:meth:`Authorizer.decide` takes what Caddy sends (``X-Forwarded-Method``,
``X-Forwarded-Uri``, the client's ``Authorization`` / ``x-api-key``) and
returns the complete answer:

1. route table (pure, no I/O): 403 blocked / 400 / 404 / 405 before the key;
2. key (:class:`~neuronetz_gateway.auth.key_verifier.KeyVerifier`): 401;
3. limits (``Limiter.admit``, one Redis round trip): 429;
4. 200 with ``X-NZ-Identity`` signed for the proxy.

The key-info routes (``GET /v1/key``, ``GET /api/key``) replace step 3 with
``Limiter.read_state`` (one read-only round trip: no RPM hit, no lease, never
a 429) and sign what it read into the identity, which the proxy renders.

Steps 2-3 run under ``decision_timeout_seconds``; a timeout or an
unreachable Redis/Postgres answers 503 with ``Retry-After``, never 2xx.

Keys are accepted as ``Authorization: Bearer <key>`` (what the OpenAI and
Ollama clients send) or ``x-api-key: <key>``; when ``Authorization`` is
present it is the one used, whatever its scheme.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Protocol

from neuronetz_gateway.adapters.redis_limiter import LimiterUnavailable
from neuronetz_gateway.auth import responses
from neuronetz_gateway.auth.key_verifier import KeyCheck, KeyStoreUnavailable
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.auth.responses import Answer
from neuronetz_gateway.domain.dialect import surface_of
from neuronetz_gateway.domain.identity import Identity, Limits, sign_identity
from neuronetz_gateway.domain.key_info import KEY_INFO_ROUTES, allowance_of
from neuronetz_gateway.domain.key_state import KeyState
from neuronetz_gateway.domain.limits import Decision
from neuronetz_gateway.domain.routes import Outcome, RouteMatch, classify
from neuronetz_gateway.logging import get_logger, info_line
from neuronetz_gateway.shared_timeout import SharedTimeout
from neuronetz_gateway.tracing import Tracing

__all__ = [
    "Admission",
    "Authorizer",
    "DecisionRequest",
    "KeyChecker",
    "new_request_id",
    "presented_key",
]

log = get_logger("neuronetz_gateway.auth")

_SANE_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id() -> str:
    """A fresh random UUID4 in hex, as ``uuid.uuid4().hex`` spells it (at a third of its cost)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key the client presented: ``Authorization: Bearer`` first, else ``x-api-key``."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return api_key.strip() if api_key else None


class DecisionRequest:
    """The parts of a forward_auth call the decision needs (header values as sent)."""

    __slots__ = ("api_key", "authorization", "client_request_id", "method", "traceparent", "uri")

    def __init__(
        self,
        method: str | None,
        uri: str | None,
        authorization: str | None = None,
        api_key: str | None = None,
        client_request_id: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        self.method = method
        self.traceparent = traceparent  # the client's W3C trace context (read if tracing is on)
        self.uri = uri
        self.authorization = authorization
        self.api_key = api_key
        self.client_request_id = client_request_id


class KeyChecker(Protocol):
    """The key verifier's port (:class:`~neuronetz_gateway.auth.key_verifier.KeyVerifier`).

    Raises :class:`KeyStoreUnavailable` when the key cannot be checked.
    """

    async def check(self, presented: str | None) -> KeyCheck: ...


class Admission(Protocol):
    """The limiter's port for a decision (Redis: ``adapters/redis_limiter.Limiter``).

    Raises :class:`LimiterUnavailable` when it cannot be asked.
    """

    async def admit(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
    ) -> Decision: ...

    async def read_state(
        self, *, tenant_id: int, key_id: int, key_limits: Limits, tenant_limits: Limits
    ) -> KeyState: ...


class Authorizer:
    """Decides /authorize requests; every collaborator is passed in (as a port)."""

    def __init__(
        self,
        *,
        verifier: KeyChecker,
        limiter: Admission,
        secret: bytes,
        metrics: AuthMetrics,
        identity_ttl_seconds: int,
        timeout_seconds: float,
        clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> None:
        self._verifier = verifier
        self.tracing = tracing
        self._limiter = limiter
        self._secret = secret
        self._metrics = metrics
        self._identity_ttl_ms = identity_ttl_seconds * 1000
        # asyncio.timeout(timeout_seconds), one timer for every decision in flight
        self._bounded = SharedTimeout(timeout_seconds)
        self._clock = clock

    async def decide(self, request: DecisionRequest) -> Answer:
        """The complete answer for one forward_auth call; never raises."""
        started = time.perf_counter()
        request_id = new_request_id()  # ours: a client's X-Request-Id is only logged
        fields: dict[str, object] = {"request_id": request_id}
        tracing, span, traceparent = self.tracing, None, None
        if tracing is not None:
            span = tracing.start("authorize", request.traceparent)
            traceparent = tracing.traceparent(span)
        try:
            answer, outcome, reason = await self._decide(request, request_id, fields, traceparent)
        except Exception:  # a bug must still fail closed, in the route's dialect, not 500
            log.exception("authorize_failed", request_id=request_id)
            surface = surface_of((request.uri or "").split("?", 1)[0])
            answer, outcome, reason = responses.unavailable(surface, request_id), "error", "bug"
        answer = responses.with_request_id(answer, request_id)
        elapsed = time.perf_counter() - started
        self._metrics.decision(outcome, reason, elapsed)
        if span is not None:
            Tracing.finish(
                span, _span_attributes(fields, outcome, reason), status_code=answer.status
            )
        client_id = request.client_request_id
        if client_id is not None and _SANE_CLIENT_ID.fullmatch(client_id):
            fields["client_request_id"] = client_id
        fields["status"] = answer.status
        fields["outcome"] = outcome
        fields["reason"] = reason
        fields["latency_ms"] = round(elapsed * 1000, 3)
        info_line(log, "authorize", fields)
        return answer

    async def _decide(
        self,
        request: DecisionRequest,
        request_id: str,
        fields: dict[str, object],
        traceparent: str | None,
    ) -> tuple[Answer, str, str]:
        if request.method is None or request.uri is None:
            return responses.bad_request("native"), "refused", "no_forwarded_request"
        match = classify(request.method, request.uri)
        if match.route is None:
            return _route_refusal(match), "refused", match.outcome.value
        route, surface = match.route, match.surface
        fields["route"] = route.id
        try:
            async with self._bounded():
                check = await self._verifier.check(
                    presented_key(request.authorization, request.api_key)
                )
                if check.prefix is not None:
                    fields["key_prefix"] = check.prefix
                key = check.key
                if key is None:
                    return responses.unauthorized(surface), "refused", check.reason
                fields["tenant"] = key.tenant_name
                state: KeyState | None = None
                if route.id in KEY_INFO_ROUTES:
                    state = await self._limiter.read_state(
                        tenant_id=key.tenant_id,
                        key_id=key.key_id,
                        key_limits=key.key_limits,
                        tenant_limits=key.tenant_limits,
                    )
                    allowance = allowance_of(state, key.key_limits, key.tenant_limits)
                    decision = Decision(allowed=True, allowance=allowance)
                else:
                    decision = await self._limiter.admit(
                        tenant_id=key.tenant_id,
                        key_id=key.key_id,
                        key_limits=key.key_limits,
                        tenant_limits=key.tenant_limits,
                        request_id=request_id,
                    )
                    self._metrics.tenant_budgets(
                        key.tenant_name, key.tenant_limits, decision.tenant_usage
                    )
        except TimeoutError:
            return responses.unavailable(surface, request_id), "unavailable", "timeout"
        except KeyStoreUnavailable:
            return responses.unavailable(surface, request_id), "unavailable", "key_store"
        except LimiterUnavailable:
            return responses.unavailable(surface, request_id), "unavailable", "limiter"
        if not decision.allowed:
            reason = f"{decision.level}_{decision.reason}"
            return responses.too_many_requests(surface, decision, request_id), "refused", reason
        identity = Identity(
            request_id=request_id,
            tenant_id=key.tenant_id,
            tenant_name=key.tenant_name,
            key_id=key.key_id,
            key_prefix=key.prefix,
            route=route.id,
            expires_at_ms=int(self._clock() * 1000) + self._identity_ttl_ms,
            models=key.models,
            caps=key.caps,
            key_limits=key.key_limits,
            tenant_limits=key.tenant_limits,
            lease_id=decision.lease_id,
            allowance=decision.allowance,
            log_prompts=key.log_prompts,
            prompt_ttl_days=key.prompt_ttl_days,
            key_state=state,
            traceparent=traceparent,
        )
        token = sign_identity(identity, self._secret)
        reason = "ok" if state is None else "key_info"
        return responses.allowed(token, request_id), "allowed", reason


def _span_attributes(fields: dict[str, object], outcome: str, reason: str) -> dict[str, str]:
    """What auth's span says: ids, route, tenant, decision (never the key, not even its prefix)."""
    attributes = {
        "neuronetz.request_id": str(fields["request_id"]),
        "neuronetz.decision.outcome": outcome,
        "neuronetz.decision.reason": reason,
    }
    if "route" in fields:
        attributes["neuronetz.route"] = str(fields["route"])
    if "tenant" in fields:
        attributes["neuronetz.tenant"] = str(fields["tenant"])
    return attributes


def _route_refusal(match: RouteMatch) -> Answer:
    if match.outcome is Outcome.BLOCKED:
        return responses.blocked(match.surface)
    if match.outcome is Outcome.METHOD_NOT_ALLOWED:
        return responses.method_not_allowed(match.surface, match.allow)
    if match.outcome is Outcome.BAD_REQUEST:
        return responses.bad_request(match.surface)
    return responses.not_found(match.surface)
