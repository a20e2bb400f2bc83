"""The one route table: auth classifies with it, the proxy serves every row of it."""

from __future__ import annotations

from neuronetz_gateway.domain.dialect import surface_of
from neuronetz_gateway.domain.routes import MODEL_ROUTE, ROUTES, SURFACE_BY_ID, Outcome, classify
from neuronetz_gateway.proxy.routes import proxied_fast_paths, proxied_route_handlers


def test_the_proxy_serves_exactly_the_routes_auth_allows() -> None:
    fast = proxied_fast_paths()
    assert set(fast) == {r.path for r in ROUTES} - {"/v1/models"}  # that one is a mount
    names = {h.name for h in proxied_route_handlers()}
    assert names == {r.id for r in ROUTES}
    for route in ROUTES:
        match = classify(route.method, route.path)
        assert (match.outcome, match.route) == (Outcome.ALLOWED, route)


def test_each_row_names_its_dialect_and_a_fixed_upstream_path() -> None:
    for route in (*ROUTES, MODEL_ROUTE):
        assert route.surface == surface_of(route.path) == SURFACE_BY_ID[route.id]
        if route.upstream is not None:
            assert route.upstream.startswith("/api/")
            assert route.upstream.split("/")[2] in {
                "generate", "chat", "embed", "embeddings", "show", "ps", "version"
            }  # fmt: skip
    model_routes = {r.id: r.upstream for r in ROUTES if r.codec != "key_info"}
    assert model_routes["v1.chat.completions"] == model_routes["v1.messages"] == "/api/chat"
    assert model_routes["tags"] is None  # answered from the discovered catalogue
