"""The per-backend circuit breaker: closed, open, half-open, on an injected clock."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.circuit_breaker import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    Outcome,
)

POLICY = BreakerPolicy(failure_threshold=3, open_seconds=5.0, trial_requests=1)
FAILURES = [Outcome.CONNECT_ERROR, Outcome.SERVER_ERROR, Outcome.TIMEOUT]


def _opened(now: float = 0.0) -> CircuitBreaker:
    breaker = CircuitBreaker(POLICY)
    for _ in range(3):
        breaker.record(Outcome.TIMEOUT, now)
    return breaker


@pytest.mark.parametrize("failure", FAILURES)
def test_opens_after_the_threshold_of_failures_in_a_row(failure: Outcome) -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.record(failure, 0.0) is CircuitState.CLOSED
    assert breaker.record(failure, 0.1) is CircuitState.CLOSED
    assert breaker.allow(0.2)
    assert breaker.record(failure, 0.2) is CircuitState.OPEN
    assert not breaker.allow(0.3) and not breaker.available(0.3)


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.record(Outcome.SERVER_ERROR, 0.0)
    breaker.record(Outcome.SERVER_ERROR, 0.0)
    breaker.record(Outcome.SUCCESS, 0.0)
    breaker.record(Outcome.SERVER_ERROR, 0.0)
    assert breaker.state(0.0) is CircuitState.CLOSED
    assert breaker.snapshot(0.0).consecutive_failures == 1


def test_half_open_after_open_seconds_lets_one_trial_through() -> None:
    breaker = _opened()
    assert breaker.state(4.9) is CircuitState.OPEN
    assert breaker.state(5.0) is CircuitState.HALF_OPEN
    assert breaker.available(5.0)
    assert breaker.allow(5.0)
    assert not breaker.allow(5.1)  # the one trial is out
    assert not breaker.available(5.1)


def test_a_successful_trial_closes() -> None:
    breaker = _opened()
    assert breaker.allow(6.0)
    assert breaker.record(Outcome.SUCCESS, 6.5) is CircuitState.CLOSED
    assert breaker.snapshot(6.5).consecutive_failures == 0
    assert breaker.allow(6.6) and breaker.allow(6.6)


def test_a_failed_trial_opens_again_for_open_seconds() -> None:
    breaker = _opened()
    breaker.allow(6.0)
    assert breaker.record(Outcome.CONNECT_ERROR, 6.0) is CircuitState.OPEN
    assert breaker.state(10.9) is CircuitState.OPEN
    assert breaker.state(11.0) is CircuitState.HALF_OPEN
    assert breaker.snapshot(6.0).opened_at == 6.0


def test_a_trial_that_never_reports_frees_its_place_after_open_seconds() -> None:
    breaker = _opened()
    assert breaker.allow(5.0)
    assert not breaker.allow(9.9)
    assert breaker.allow(10.0)


def test_a_late_success_while_open_does_not_close() -> None:
    breaker = _opened()
    assert breaker.record(Outcome.SUCCESS, 1.0) is CircuitState.OPEN


def test_an_active_check_closes_an_idle_backend_after_the_cooldown() -> None:
    breaker = _opened()
    # no request went out; the periodic check succeeds once half-open
    assert breaker.record(Outcome.SUCCESS, 5.5) is CircuitState.CLOSED


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (404, Outcome.SUCCESS),
        (429, Outcome.SUCCESS),
        (500, Outcome.SERVER_ERROR),
        (502, Outcome.SERVER_ERROR),
        (503, Outcome.SERVER_ERROR),
    ],
)
def test_outcome_of_a_status(status: int, outcome: Outcome) -> None:
    assert Outcome.of_status(status) is outcome


@pytest.mark.parametrize(
    "policy",
    [
        {"failure_threshold": 0},
        {"trial_requests": 0},
        {"open_seconds": 0.0},
    ],
)
def test_policy_bounds(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(**policy)  # type: ignore[arg-type]


def _opened_with(trials: int) -> CircuitBreaker:
    breaker = CircuitBreaker(
        BreakerPolicy(failure_threshold=1, open_seconds=5.0, trial_requests=trials)
    )
    breaker.record(Outcome.CONNECT_ERROR, 0.0)
    return breaker


def test_half_open_lets_exactly_trial_requests_through_at_a_time() -> None:
    breaker = _opened_with(3)
    assert [breaker.allow(5.0 + i / 10) for i in range(5)] == [True, True, True, False, False]
    assert breaker.state(5.5) is CircuitState.HALF_OPEN
    assert not breaker.available(5.5)  # routing sees it full, not closed


def test_one_successful_trial_of_several_closes_and_lets_everything_through() -> None:
    breaker = _opened_with(2)
    assert breaker.allow(5.0) and breaker.allow(5.1)
    assert breaker.record(Outcome.SUCCESS, 5.2) is CircuitState.CLOSED
    assert all(breaker.allow(5.3) for _ in range(10))


def test_one_failed_trial_of_several_reopens_and_drops_the_others() -> None:
    breaker = _opened_with(2)
    assert breaker.allow(5.0) and breaker.allow(5.1)
    assert breaker.record(Outcome.SERVER_ERROR, 5.2) is CircuitState.OPEN
    assert not breaker.allow(5.3)
    # the other trial's late success proves nothing while open
    assert breaker.record(Outcome.SUCCESS, 5.4) is CircuitState.OPEN
    # after the new pause, a fresh set of trials
    assert [breaker.allow(10.5), breaker.allow(10.5), breaker.allow(10.5)] == [True, True, False]
