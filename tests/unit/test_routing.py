"""Routing a model request across a fleet of backends (domain/routing.py)."""

from __future__ import annotations

from collections import Counter

from neuronetz_gateway.domain.routing import (
    BackendView,
    Costs,
    Route,
    plan_route,
    rendezvous_order,
)

M = "llama3.2:latest"
OTHER = "qwen3:8b"


def gpu(name: str, *, slots: int = 2, busy: int = 0, queued: int = 0, **kw: object) -> BackendView:
    installed = kw.pop("installed", frozenset({M, OTHER}))
    loaded = kw.pop("loaded", frozenset())
    return BackendView(
        name,
        slots,
        installed=installed,  # type: ignore[arg-type]
        loaded=loaded,  # type: ignore[arg-type]
        busy=busy,
        queued=queued,
        **kw,  # type: ignore[arg-type]
    )


def test_only_backends_that_have_the_model() -> None:
    a = gpu("a", installed=frozenset({OTHER}))
    b = gpu("b", installed=frozenset({M}))
    assert plan_route("llama3.2", [a, b]).candidates == ("b",)


def test_model_names_are_canonicalised() -> None:
    b = gpu("b", installed=frozenset({M}))
    route = plan_route("library/LLAMA3.2", [b])
    assert route.model == M
    assert route.first == "b"


def test_unhealthy_drained_and_slotless_backends_are_skipped() -> None:
    sick = gpu("sick", healthy=False, loaded=frozenset({M}))
    drained = gpu("drained", active=False, loaded=frozenset({M}))
    empty = gpu("empty", slots=0)
    ok = gpu("ok")
    assert plan_route(M, [sick, drained, empty, ok]).candidates == ("ok",)
    assert plan_route(M, [sick, drained]).candidates == ()
    assert plan_route(M, [sick]).first is None


def test_loaded_with_a_free_slot_beats_a_cold_load() -> None:
    cold = gpu("a-cold", slots=8)
    warm = gpu("b-warm", slots=2, busy=1, loaded=frozenset({M}))
    assert plan_route(M, [cold, warm]).candidates == ("b-warm", "a-cold")


def test_a_wait_shorter_than_a_load_where_it_is_loaded_beats_a_load_on_an_idle_backend() -> None:
    full_warm = gpu("a", busy=2, queued=0, loaded=frozenset({M}))
    idle_cold = gpu("b", loaded=frozenset({OTHER}))
    costs = Costs(service_seconds=1.0, load_seconds=3.0)  # wait: 1 ahead / 2 slots x 1 s
    route = plan_route(M, [idle_cold, full_warm], costs=costs)
    assert route.candidates == ("a", "b")
    assert route.wait_at == "a"  # queue there rather than try the load


def test_a_load_shorter_than_the_wait_goes_first_on_an_idle_backend() -> None:
    full_warm = gpu("a", busy=2, queued=5, loaded=frozenset({M}))  # 6 ahead / 2 x 1 s = 3 s
    idle_cold = gpu("b", loaded=frozenset({OTHER}))
    route = plan_route(
        M, [full_warm, idle_cold], costs=Costs(service_seconds=1.0, load_seconds=2.0)
    )
    assert route.candidates == ("b", "a")
    assert route.wait_at == "a"  # if the load's slot went to someone else: wait, warm


def test_no_load_that_evicts_a_model_in_use_while_the_model_can_wait_where_loaded() -> None:
    full_warm = gpu("a", busy=2, queued=30, loaded=frozenset({M}))  # a long wait
    busy_other = gpu("b", slots=8, busy=1, loaded=frozenset({OTHER}))  # 7 slots free
    queued_other = gpu("c", busy=0, queued=1, loaded=frozenset({OTHER}))
    costs = Costs(service_seconds=1.0, load_seconds=0.1)
    route = plan_route(M, [busy_other, queued_other, full_warm], costs=costs)
    assert route.first == "a"
    assert route.wait_at == "a"


def test_a_load_with_room_for_another_model_evicts_nothing() -> None:
    full_warm = gpu("a", busy=2, queued=5, loaded=frozenset({M}))
    roomy = gpu("b", slots=4, busy=1, loaded=frozenset({OTHER}), models=2)
    route = plan_route(M, [full_warm, roomy], costs=Costs(service_seconds=1.0, load_seconds=2.0))
    assert route.first == "b"


def test_loaded_nowhere_the_load_goes_where_the_least_is_held() -> None:
    a = gpu("a", slots=4, busy=3, loaded=frozenset({OTHER}))
    b = gpu("b", slots=4, busy=1, loaded=frozenset({OTHER}))
    route = plan_route(M, [a, b])
    assert route.candidates == ("b", "a")
    assert route.wait_at is None  # nowhere warm to wait: try each for a free slot


def test_a_load_that_takes_the_last_copy_of_a_model_in_demand_costs_two_loads() -> None:
    full_warm = gpu("a", busy=2, queued=2, loaded=frozenset({M}))  # 3 / 2 x 1 s = 1.5 s
    costs = Costs(service_seconds=1.0, load_seconds=1.0)
    last_copy = gpu("b", loaded=frozenset({OTHER}), recent=frozenset({OTHER}))
    assert plan_route(M, [full_warm, last_copy], costs=costs).first == "a"  # 1.5 < 2 x 1
    copy_elsewhere = gpu("c", installed=frozenset({OTHER}), loaded=frozenset({OTHER}))
    assert plan_route(M, [full_warm, last_copy, copy_elsewhere], costs=costs).first == "b"
    not_in_demand = gpu("b", loaded=frozenset({OTHER}))
    assert plan_route(M, [full_warm, not_in_demand], costs=costs).first == "b"


def test_loaded_nowhere_a_load_evicts_a_model_loaded_elsewhere_too_first() -> None:
    only_copy = gpu("a", slots=4, busy=1, loaded=frozenset({OTHER}))
    one_of_two = gpu("b", slots=4, busy=3, loaded=frozenset({"phi3:latest"}))
    twin = gpu("c", slots=4, busy=3, installed=frozenset(), loaded=frozenset({"phi3:latest"}))
    assert plan_route(M, [only_copy, one_of_two, twin]).candidates == ("b", "a")


def test_never_cold_load_while_another_has_it_loaded_and_free_even_for_a_session() -> None:
    warm = gpu("warm", busy=1, loaded=frozenset({M}))
    for i in range(200):
        cold = gpu(f"cold{i % 5}")
        route = plan_route(M, [cold, warm], session=f"s{i}")
        assert route.first == "warm"


def test_all_full_the_shortest_queue_per_slot_first() -> None:
    a = gpu("a", slots=2, busy=2, queued=3)
    b = gpu("b", slots=4, busy=4, queued=5)
    c = gpu("c", slots=2, busy=2, queued=1)
    assert plan_route(M, [a, b, c]).candidates == ("c", "b", "a")


def test_all_full_equal_queues_the_one_with_the_model_loaded_first() -> None:
    a = gpu("a", busy=2, queued=1)
    b = gpu("b", busy=2, queued=1, loaded=frozenset({M}))
    assert plan_route(M, [a, b]).first == "b"


def test_without_a_session_the_most_free_slots_first() -> None:
    a = gpu("a", slots=4, busy=3, loaded=frozenset({M}))
    b = gpu("b", slots=4, busy=1, loaded=frozenset({M}))
    assert plan_route(M, [a, b]).candidates == ("b", "a")
    assert plan_route(M, [a, b]).sticky is False


def test_a_session_sticks_to_one_backend_while_it_is_in_the_best_tier() -> None:
    backends = [
        gpu(n, slots=4, busy=b, loaded=frozenset({M}))
        for n, b in zip("abc", (0, 1, 3), strict=True)
    ]
    firsts = {plan_route(M, backends, session="sess-1").first for _ in range(5)}
    assert len(firsts) == 1
    # the load changes but the session's backend stays in the warm tier: it stays
    chosen = firsts.pop()
    shifted = [
        BackendView(
            b.name, 4, installed=b.installed, loaded=b.loaded, busy=(3 if b.name == chosen else 0)
        )
        for b in backends
    ]
    route = plan_route(M, shifted, session="sess-1")
    assert route.first == chosen
    assert route.sticky is True


def test_sessions_spread_over_backends() -> None:
    backends = [gpu(n, slots=4, loaded=frozenset({M})) for n in ("a", "b", "c")]
    counts = Counter(plan_route(M, backends, session=f"user-{i}").first for i in range(3000))
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 800  # about 1000 each


def test_a_sessions_backend_gone_moves_only_its_sessions() -> None:
    names = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    before = {f"s{i}": rendezvous_order(f"s{i}", names)[0] for i in range(2000)}
    after = {f"s{i}": rendezvous_order(f"s{i}", names[:3])[0] for i in range(2000)}
    moved = [s for s in before if before[s] != after[s]]
    assert moved, "removing a backend moves its sessions"
    assert all(before[s] == "d" for s in moved)


def test_backend_weight_draws_proportionally_more_sessions() -> None:
    counts = Counter(rendezvous_order(f"s{i}", [("big", 3), ("small", 1)])[0] for i in range(4000))
    assert 2.4 < counts["big"] / counts["small"] < 3.7  # 3:1


def test_failover_is_the_next_other_candidate() -> None:
    route = Route(M, ("a", "b", "c"))
    assert route.failover("a") == "b"
    assert route.failover("b") == "a"
    assert Route(M, ("a",)).failover("a") is None
