"""The loaded models per backend, corrected by our own routing (domain/residency.py)."""

from __future__ import annotations

from neuronetz_gateway.domain.residency import DEFAULT_LOAD_SECONDS, Residency, Timings

A, B, C = "llama3.2:latest", "qwen2.5:0.5b", "mistral:7b"


def test_without_routing_the_poll_stands() -> None:
    residency = Residency(horizon_seconds=5)
    assert residency.loaded("gpu", frozenset({A}), now=0.0) == {A}


def test_a_model_routed_to_a_one_model_backend_replaces_what_the_poll_shows() -> None:
    residency = Residency(horizon_seconds=5)
    residency.polled("gpu", frozenset({A}))
    residency.routed("gpu", B, now=10.0)
    assert residency.loaded("gpu", frozenset({A}), now=11.0) == {B}
    residency.routed("gpu", A, now=12.0)
    assert residency.loaded("gpu", frozenset({B}), now=12.5) == {A}  # the latest wins


def test_past_the_horizon_the_poll_has_caught_up() -> None:
    residency = Residency(horizon_seconds=5)
    residency.routed("gpu", B, now=10.0)
    assert residency.loaded("gpu", frozenset({A}), now=15.5) == {A}


def test_capacity_is_learned_from_the_most_models_a_poll_showed_together() -> None:
    residency = Residency(horizon_seconds=5)
    assert residency.capacity("gpu") == 1
    residency.polled("gpu", frozenset({A, B}))
    residency.polled("gpu", frozenset({A}))
    assert residency.capacity("gpu") == 2
    residency.routed("gpu", C, now=1.0)
    # room for two: the one routed and one of the polled
    view = residency.loaded("gpu", frozenset({A, B}), now=1.5)
    assert C in view
    assert len(view) == 2


def test_two_routed_models_on_a_two_model_backend_both_count() -> None:
    residency = Residency(horizon_seconds=5)
    residency.polled("gpu", frozenset({A, B}))
    residency.routed("gpu", B, now=1.0)
    residency.routed("gpu", C, now=2.0)
    assert residency.loaded("gpu", frozenset({A, B}), now=2.5) == {B, C}


def test_timings_start_from_defaults_and_follow_what_is_seen() -> None:
    timings = Timings()
    assert timings.load_seconds == DEFAULT_LOAD_SECONDS
    timings.loaded(0.4)
    assert timings.load_seconds == 0.4  # the first observation replaces the guess
    timings.loaded(1.4)
    assert 0.4 < timings.load_seconds < 1.4
    timings.served(0.0)  # nothing learned from an empty answer
    timings.served(0.5)
    assert timings.service_seconds == 0.5


def test_recent_is_what_was_routed_within_the_horizon() -> None:
    residency = Residency(horizon_seconds=5)
    residency.routed("gpu", A, now=1.0)
    residency.routed("gpu", B, now=4.0)
    assert residency.recent("gpu", now=7.0) == {B}
    assert residency.recent("other", now=7.0) == frozenset()


def test_a_refused_request_loaded_nothing() -> None:
    residency = Residency(horizon_seconds=5)
    residency.routed("gpu", B, now=1.0)
    residency.refused("gpu", B)
    assert residency.loaded("gpu", frozenset({A}), now=2.0) == {A}
