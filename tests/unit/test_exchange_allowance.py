"""The proxy's x-ratelimit-* allowance: auth's request values, the limiter's token values."""

from __future__ import annotations

from neuronetz_gateway.domain.identity import Allowance
from neuronetz_gateway.proxy.exchange import _merge_tokens


def test_token_values_replace_and_request_values_stay() -> None:
    admitted = Allowance(
        limit_requests=100, remaining_requests=99, reset_requests_ms=700, remaining_tokens=5
    )
    update = Allowance(
        limit_requests=1, limit_tokens=1000, remaining_tokens=900, reset_tokens_ms=30
    )
    assert _merge_tokens(admitted, update) == Allowance(
        limit_requests=100,  # requests stay as admitted
        remaining_requests=99,
        reset_requests_ms=700,
        limit_tokens=1000,
        remaining_tokens=900,
        reset_tokens_ms=30,
    )


def test_nothing_known_is_the_same_allowance() -> None:
    admitted = Allowance(remaining_requests=3)
    assert _merge_tokens(admitted, Allowance()) is admitted
