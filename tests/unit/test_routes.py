"""The route table: default deny, hard blocks under every spelling, exact canonical allows."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.routes import (
    BLOCKED_ROUTES,
    ROUTES,
    Outcome,
    classify,
    normalise_for_block_check,
)

ALLOWED = [(r.method, r.path, r.id) for r in ROUTES]


@pytest.mark.parametrize(("method", "path", "route_id"), ALLOWED)
def test_every_canonical_route_is_allowed_with_its_id(
    method: str, path: str, route_id: str
) -> None:
    match = classify(method, path)
    assert match.outcome is Outcome.ALLOWED
    assert match.route is not None
    assert match.route.id == route_id
    if path.startswith("/v1/messages"):
        assert match.surface == "anthropic"
    else:
        assert match.surface == ("openai" if path.startswith("/v1/") else "native")


def test_route_ids_are_the_specified_ones() -> None:
    assert {r.id for r in ROUTES} | {"v1.model"} == {
        "generate", "chat", "embed", "embeddings", "show", "tags", "ps", "version", "key",
        "v1.chat.completions", "v1.completions", "v1.embeddings", "v1.models", "v1.model", "v1.key",
        "v1.messages", "v1.messages.count_tokens", "v1.responses",
    }  # fmt: skip


BLOCKED_SPELLINGS = [
    *(f"/api/{name}" for name in BLOCKED_ROUTES),
    "/api/blobs/sha256:0123abcd",
    "/api/pull/",
    "/api/pull.",
    "/api/pull./",
    "/api/pull%2e",
    "/API/PULL",
    "/Api/Push",
    "/api//pull",
    "//api/pull",
    "/api/./pull",
    "/api/x/../pull",
    "/v1/../api/pull",
    "/api/generate/../pull",
    "/api/pull;jsessionid=1",
    "/api;x/pull",
    "/api/%70ull",
    "/api/pu%6Cl",
    "/api%2Fpull",
    "/api%2fpull",
    "%2Fapi%2Fpull",
    "/api/%2570ull",
    "/api%252Fpull",
    "/api/%25%37%30ull",
    "/api%255C%2570ull",
    "/api\\pull",
    "/api%5Cpull",
    "/api/pull%20",
    "/api/pull%3Fx=1",
    "/api/pull%23frag",
    "/api/%EF%BD%90%EF%BD%95%EF%BD%8C%EF%BD%8C",  # fullwidth "pull" (NFKC folds it)
    "/api/pu%C5%BFh",  # long s (U+017F): NFKC folds it to "s" -> "push"
    "/%EF%BC%8Fapi%EF%BC%8Fpull",  # fullwidth solidus
    "/api/blobs",
    "/api/BLOBS/x",
    "/api/delete/..;/delete",
    "/v1/models/..%2F..%2Fapi%2Fpull",
    "/v1/models/../../api/copy",
    "/./api/create",
    "/api/create...",
]


@pytest.mark.parametrize("path", BLOCKED_SPELLINGS)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "HEAD"])
def test_blocked_routes_are_403_under_every_spelling(method: str, path: str) -> None:
    assert classify(method, path).outcome is Outcome.BLOCKED


REJECTED_SPELLINGS = [
    "/api/pull%00",
    "/api/pu%00ll",
    "/api/pull%0d%0a",
    "/api/\x00pull",
    "/api/pu%C0%ACll",  # overlong UTF-8
    "/api/%C0%AFpull",
    "/api/pu\u200bll",  # zero-width space survives NFKC: not ASCII
    "/api/pu%E2%80%8Bll",
    "/api/%25252525252570ull",  # keeps decoding
    "http://ollama:11434/api/pull",
]


@pytest.mark.parametrize("path", REJECTED_SPELLINGS)
def test_unreadable_spellings_are_refused_never_allowed(path: str) -> None:
    outcome = classify("POST", path).outcome
    assert outcome in {Outcome.BAD_REQUEST, Outcome.BLOCKED}


def test_at_least_25_blocked_spellings_are_covered() -> None:
    assert len(BLOCKED_SPELLINGS) + len(REJECTED_SPELLINGS) >= 25


NOT_FOUND = [
    "/",
    "/api",
    "/api/me",
    "/api/signout",
    "/api/experimental/web_search",
    "/api/experimental",
    "/v1/responses/",
    "/v1/responses/resp_1",
    "/v1/messages/",
    "/v1/messages/batches",
    "/v1",
    "/v2/models",
    "/healthz",
    # spellings of allowed routes that are not canonical: never allowed
    "/api/Generate",
    "/API/chat",
    "/api/chat/",
    "/api//chat",
    "/api/./chat",
    "/api/chat;x",
    "/api/%63hat",
    "/v1/chat//completions",
    "/api/x/../chat",
]


@pytest.mark.parametrize("path", NOT_FOUND)
def test_unknown_and_non_canonical_paths_are_404(path: str) -> None:
    assert classify("POST", path).outcome is Outcome.NOT_FOUND


def test_wrong_method_is_405_with_allow() -> None:
    match = classify("GET", "/api/chat")
    assert match.outcome is Outcome.METHOD_NOT_ALLOWED
    assert match.allow == ("POST",)
    match = classify("POST", "/v1/models")
    assert match.outcome is Outcome.METHOD_NOT_ALLOWED
    assert match.allow == ("GET",)
    assert classify("HEAD", "/api/tags").outcome is Outcome.METHOD_NOT_ALLOWED
    assert classify("post", "/api/chat").outcome is Outcome.METHOD_NOT_ALLOWED
    assert classify("DELETE", "/v1/models/llama3.2").allow == ("GET",)


def test_query_string_allowed_on_get_routes_only() -> None:
    assert classify("GET", "/api/tags?x=1").outcome is Outcome.ALLOWED
    assert classify("GET", "/v1/models?limit=5").outcome is Outcome.ALLOWED
    assert classify("POST", "/api/chat?stream=true").outcome is Outcome.BAD_REQUEST
    assert classify("POST", "/v1/chat/completions?x=1").outcome is Outcome.BAD_REQUEST


def test_claude_codes_query_is_accepted_on_the_messages_routes() -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        match = classify("POST", f"{path}?beta=true")
        assert match.outcome is Outcome.ALLOWED
        assert match.surface == "anthropic"
    assert classify("GET", "/v1/messages").outcome is Outcome.METHOD_NOT_ALLOWED
    assert classify("GET", "/v1/messages").surface == "anthropic"
    # unknown paths below /v1/messages answer in Anthropic's dialect too
    assert classify("POST", "/v1/messages/batches").surface == "anthropic"
    # the query never unblocks: the block check reads the path only
    assert classify("GET", "/api/pull?x=/api/tags").outcome is Outcome.BLOCKED


@pytest.mark.parametrize(
    ("raw", "model"),
    [
        ("llama3.2", "llama3.2"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("llama3.2%3Alatest", "llama3.2:latest"),
        ("library%2Fx%3Atag", "library/x:tag"),
        ("library/x:tag", "library/x:tag"),
        ("hf.co/bartowski/Qwen2.5-7B-GGUF:Q4_K_M", "hf.co/bartowski/Qwen2.5-7B-GGUF:Q4_K_M"),
    ],
)
def test_model_route_takes_plain_model_ids(raw: str, model: str) -> None:
    match = classify("GET", f"/v1/models/{raw}")
    assert match.outcome is Outcome.ALLOWED
    assert match.route is not None
    assert match.route.id == "v1.model"
    assert match.model == model


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a//b",
        "./x",
        "x/..",
        "x%2F..%2Fy",
        "a/b/c/d",
        "x%252Fy",
        "x;y",
        "x%00",
        "%C3%A9",
        "-x",
        "x y",
        "x%20y",
    ],
)
def test_model_route_refuses_anything_else(raw: str) -> None:
    assert classify("GET", f"/v1/models/{raw}").outcome in {
        Outcome.BAD_REQUEST,
        Outcome.NOT_FOUND,
    }


def test_normaliser_is_aggressive() -> None:
    assert normalise_for_block_check("/API//x/..%2F.%2Fpull;a=b/") == "/api/pull"
    assert normalise_for_block_check("\\api\\pull.") == "/api/pull"


def test_errors_pick_the_dialect_of_the_path() -> None:
    assert classify("POST", "/v1/responses").surface == "openai"
    assert classify("POST", "/api/me").surface == "native"
    assert classify("POST", "/v1/../api/pull").surface == "native"
