"""The auth decision (``Authorizer.decide``) on fakes of its ports: no Redis, no Postgres."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from neuronetz_gateway.adapters.redis_limiter import LimiterUnavailable
from neuronetz_gateway.auth.authorize import Authorizer, DecisionRequest
from neuronetz_gateway.auth.key_cache import VerifiedKey
from neuronetz_gateway.auth.key_verifier import KeyCheck, KeyStoreUnavailable
from neuronetz_gateway.auth.metrics import AuthMetrics
from neuronetz_gateway.domain.identity import (
    IDENTITY_HEADER,
    Limits,
    OptionCaps,
    verify_identity,
)
from neuronetz_gateway.domain.key_state import KeyState, LevelState
from neuronetz_gateway.domain.limits import Decision

SECRET = b"authorize-unit-" + b"s" * 32
NOW = 1_900_000_000.0
KEY = "nz_live_key_presented"
VERIFIED = VerifiedKey(
    key_id=11,
    prefix="nz_abcdefgh",
    tenant_id=7,
    tenant_name="acme",
    key_limits=Limits(rpm=60),
    tenant_limits=Limits(),
    models=["llama3.2:latest"],
    caps=OptionCaps(max_num_predict=256),
    log_prompts=False,
    prompt_ttl_days=None,
    valid_until=None,
)


@dataclass
class FakeVerifier:
    result: KeyCheck | Exception = field(default_factory=lambda: KeyCheck(VERIFIED, "ok"))
    seen: list[str | None] = field(default_factory=list)
    slow: bool = False

    async def check(self, presented: str | None) -> KeyCheck:
        self.seen.append(presented)
        if self.slow:
            await asyncio.Event().wait()
        if isinstance(self.result, Exception):
            raise self.result
        if presented != KEY:
            return KeyCheck(None, "unknown")
        return self.result


@dataclass
class FakeLimiter:
    decision: Decision = field(default_factory=lambda: Decision(allowed=True, lease_id="L1"))
    unavailable: bool = False
    admitted: list[str] = field(default_factory=list)
    states: int = 0

    async def admit(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
    ) -> Decision:
        if self.unavailable:
            raise LimiterUnavailable("down")
        self.admitted.append(request_id)
        return self.decision

    async def read_state(
        self, *, tenant_id: int, key_id: int, key_limits: Limits, tenant_limits: Limits
    ) -> KeyState:
        self.states += 1
        return KeyState(read_at_ms=int(NOW * 1000), key=LevelState(), tenant=LevelState())


def _authorizer(verifier: FakeVerifier, limiter: FakeLimiter) -> Authorizer:
    return Authorizer(
        verifier=verifier,
        limiter=limiter,
        secret=SECRET,
        metrics=AuthMetrics(),
        identity_ttl_seconds=30,
        timeout_seconds=0.2,
        clock=lambda: NOW,
    )


def _headers(answer: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in answer.headers}


async def _decide(
    method: str, uri: str, key: str | None = KEY, **fakes: Any
) -> tuple[Any, FakeVerifier, FakeLimiter]:
    verifier = fakes.get("verifier") or FakeVerifier()
    limiter = fakes.get("limiter") or FakeLimiter()
    authorization = f"Bearer {key}" if key is not None else None
    answer = await _authorizer(verifier, limiter).decide(
        DecisionRequest(method, uri, authorization=authorization)
    )
    return answer, verifier, limiter


async def test_an_allowed_request_gets_an_identity_signed_for_its_route() -> None:
    answer, _, limiter = await _decide("POST", "/v1/chat/completions")

    assert answer.status == 200
    headers = _headers(answer)
    identity = verify_identity(headers[IDENTITY_HEADER], SECRET, int(NOW * 1000))
    assert (identity.route, identity.tenant_id, identity.key_id) == ("v1.chat.completions", 7, 11)
    assert identity.request_id == headers["x-request-id"] == limiter.admitted[0]
    assert (identity.lease_id, identity.caps, identity.models) == (
        "L1",
        OptionCaps(max_num_predict=256),
        ["llama3.2:latest"],
    )
    assert identity.expires_at_ms == int(NOW * 1000) + 30_000


@pytest.mark.parametrize(
    ("method", "uri", "status"),
    [
        ("POST", "/api/pull", 403),
        ("POST", "/api/%70ull", 403),
        ("GET", "/api/chat", 405),
        ("GET", "/api/me", 404),
        ("POST", "/api/chat?x=1", 400),
    ],
)
async def test_the_route_table_answers_before_the_key_is_looked_at(
    method: str, uri: str, status: int
) -> None:
    answer, verifier, limiter = await _decide(method, uri)

    assert answer.status == status
    assert verifier.seen == []
    assert limiter.admitted == []


@pytest.mark.parametrize(
    ("uri", "body"),
    [
        ("/api/chat", {"error": "invalid or missing API key"}),
        ("/v1/models", {"code": "invalid_api_key"}),
        ("/v1/messages", {"type": "authentication_error"}),
    ],
)
async def test_a_wrong_key_is_a_401_in_the_dialect_and_admits_nothing(
    uri: str, body: dict[str, str]
) -> None:
    method = "GET" if uri == "/v1/models" else "POST"
    answer, verifier, limiter = await _decide(method, uri, key="nz_wrong")

    assert answer.status == 401
    error = json.loads(answer.body)["error"]
    detail = {"error": error} if isinstance(error, str) else error
    assert body.items() <= detail.items()
    assert verifier.seen == ["nz_wrong"]
    assert limiter.admitted == []


async def test_a_limit_refusal_is_a_429_with_retry_after() -> None:
    refused = Decision(allowed=False, reason="rpm", level="key", retry_after=7)
    answer, _, _ = await _decide("POST", "/api/generate", limiter=FakeLimiter(decision=refused))

    assert answer.status == 429
    assert _headers(answer)["retry-after"] == "7"
    assert IDENTITY_HEADER not in _headers(answer)


@pytest.mark.parametrize(
    "fakes",
    [
        {"limiter": FakeLimiter(unavailable=True)},
        {"verifier": FakeVerifier(result=KeyStoreUnavailable("pg down"))},
        {"verifier": FakeVerifier(slow=True)},  # past decision_timeout_seconds
    ],
)
async def test_what_cannot_be_checked_fails_closed_with_503(fakes: dict[str, Any]) -> None:
    answer, _, _ = await _decide("POST", "/v1/chat/completions", **fakes)

    assert answer.status == 503
    assert _headers(answer)["retry-after"] == "1"
    assert IDENTITY_HEADER not in _headers(answer)


async def test_key_info_reads_the_state_and_takes_no_request() -> None:
    answer, _, limiter = await _decide("GET", "/v1/key")

    assert answer.status == 200
    assert (limiter.admitted, limiter.states) == ([], 1)
    identity = verify_identity(_headers(answer)[IDENTITY_HEADER], SECRET, int(NOW * 1000))
    assert identity.key_state == KeyState(
        read_at_ms=int(NOW * 1000), key=LevelState(), tenant=LevelState()
    )
