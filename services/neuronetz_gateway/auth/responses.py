"""The answers /authorize gives, built once where they do not vary.

Caddy's forward_auth passes every non-2xx answer to the client as it is, so
these are the client's final responses, in the dialect of the path. The
static refusals (400, 401, 403, 404, 405) are prebuilt bytes, so every 401
is byte-identical whatever the reason, but for the ``X-Request-Id`` that
:func:`with_request_id` adds to every answer for support.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from neuronetz_gateway.domain.dialect import Surface, error_body
from neuronetz_gateway.domain.identity import IDENTITY_HEADER
from neuronetz_gateway.domain.limits import Decision, ratelimit_header_pairs

__all__ = [
    "REQUEST_ID_HEADER",
    "Answer",
    "allowed",
    "bad_request",
    "blocked",
    "method_not_allowed",
    "not_found",
    "too_many_requests",
    "unauthorized",
    "unavailable",
    "with_request_id",
]

REQUEST_ID_HEADER = "x-request-id"
UNAVAILABLE_RETRY_AFTER = 1
SHOULD_RETRY_HEADER = b"x-should-retry"

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response: status, raw ASGI headers and body."""

    status: int
    headers: Headers
    body: bytes


_COMMON: Headers = ((b"cache-control", b"no-store"),)


def _error(surface: Surface, status: int, code: str, message: str, extra: Headers = ()) -> Answer:
    body = error_body(surface, status, code, message)
    headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *_COMMON,
        *extra,
    )
    return Answer(status, headers, body)


@cache
def bad_request(surface: Surface) -> Answer:
    """400: a request target the gateway will not try to read."""
    return _error(surface, 400, "invalid_request", "malformed request path")


@cache
def unauthorized(surface: Surface) -> Answer:
    """401 for every key refusal (missing, malformed, unknown, wrong, expired, revoked)."""
    return _error(
        surface,
        401,
        "invalid_api_key",
        "invalid or missing API key",
        ((b"www-authenticate", b"Bearer"),),
    )


@cache
def blocked(surface: Surface) -> Answer:
    """403 for the hard-blocked model management routes."""
    return _error(surface, 403, "forbidden", "this route is not available through the gateway")


@cache
def not_found(surface: Surface) -> Answer:
    """404 for anything outside the route table."""
    return _error(surface, 404, "not_found", "not found")


@cache
def method_not_allowed(surface: Surface, allow: tuple[str, ...]) -> Answer:
    """405 with the methods the path takes."""
    return _error(
        surface,
        405,
        "method_not_allowed",
        "method not allowed",
        ((b"allow", ", ".join(allow).encode()),),
    )


_REASON_TEXT = {
    "rpm": "requests per minute",
    "concurrency": "concurrent requests",
    "tpm": "tokens per minute",
    "daily_tokens": "daily token budget",
    "monthly_tokens": "monthly token budget",
    "total_tokens": "total token budget",
}


def _limit_message(decision: Decision) -> str:
    what = _REASON_TEXT.get(decision.reason or "", "limit")
    level = "key" if decision.level == "key" else "tenant"
    if decision.reason == "total_tokens":
        return f"{what} of this {level} is spent; it does not reset by itself"
    if decision.error_code == "budget_exceeded":
        return f"{what} of this {level} is spent; retry after {decision.retry_after} s"
    return f"{what} limit of this {level} reached; retry after {decision.retry_after} s"


def too_many_requests(surface: Surface, decision: Decision, request_id: str) -> Answer:
    """429 naming the limit, with ``Retry-After`` and the remaining allowances.

    A spent budget is not worth retrying soon: ``x-should-retry: false`` tells
    the OpenAI SDKs (Python and Node) not to retry, whatever ``Retry-After``
    says (they would otherwise sleep it, or retry at once).
    """
    extra: list[tuple[bytes, bytes]] = [
        (b"retry-after", str(max(1, decision.retry_after)).encode()),
        (REQUEST_ID_HEADER.encode(), request_id.encode()),
    ]
    code = decision.error_code or "rate_limit_exceeded"
    if code == "budget_exceeded":
        extra.append((SHOULD_RETRY_HEADER, b"false"))
    extra += ratelimit_header_pairs(decision.allowance)
    body = error_body(surface, 429, code, _limit_message(decision), limit=decision.reason)
    headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *_COMMON,
        *extra,
    )
    return Answer(429, headers, body)


def unavailable(surface: Surface, request_id: str) -> Answer:
    """503 with ``Retry-After``: a check could not be made, so nothing is let through."""
    extra = (
        (b"retry-after", str(UNAVAILABLE_RETRY_AFTER).encode()),
        (REQUEST_ID_HEADER.encode(), request_id.encode()),
    )
    return _error(
        surface, 503, "service_unavailable", "service temporarily unavailable; retry later", extra
    )


_IDENTITY = IDENTITY_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()


def with_request_id(answer: Answer, request_id: str) -> Answer:
    """``answer`` with ``X-Request-Id`` (unless it has one): every answer names its request."""
    if any(name == _REQUEST_ID for name, _ in answer.headers):
        return answer
    return Answer(answer.status, (*answer.headers, (_REQUEST_ID, request_id.encode())), answer.body)


_ALLOWED_COMMON: Headers = ((b"content-length", b"0"), *_COMMON)


def allowed(identity_token: str, request_id: str) -> Answer:
    """200 with the signed identity (the one header Caddy copies) and the request id."""
    return Answer(
        200,
        (
            (_IDENTITY, identity_token.encode()),
            (_REQUEST_ID, request_id.encode()),
            *_ALLOWED_COMMON,
        ),
        b"",
    )
