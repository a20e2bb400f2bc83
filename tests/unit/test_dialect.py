"""Error bodies in the dialect of the surface."""

from __future__ import annotations

import json

import pytest

from neuronetz_gateway.domain.dialect import error_body, error_type, surface_of


def test_native_body_is_a_plain_error_string() -> None:
    body = error_body("/api/chat", 401, "invalid_api_key", "invalid or missing API key")
    assert json.loads(body) == {"error": "invalid or missing API key"}


def test_openai_body_is_the_error_object() -> None:
    body = error_body("/v1/chat/completions", 429, "rate_limit_exceeded", "slow down")
    assert json.loads(body) == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }


@pytest.mark.parametrize(
    ("surface", "expected"),
    [("native", {"error": "m"}), ("openai", {"error": {"message": "m"}})],
)
def test_surface_may_be_named(surface: str, expected: dict[str, object]) -> None:
    decoded = json.loads(error_body(surface, 404, "not_found", "m"))
    if surface == "openai":
        assert decoded["error"]["message"] == "m"
        assert decoded["error"]["code"] == "not_found"
    else:
        assert decoded == expected


def test_types_follow_openai() -> None:
    assert error_type(401, "invalid_api_key") == "invalid_request_error"
    assert error_type(429, "budget_exceeded") == "insufficient_quota"
    assert error_type(503, "service_unavailable") == "server_error"


def test_surface_of() -> None:
    assert surface_of("/v1/models") == "openai"
    assert surface_of("/v1") == "openai"
    assert surface_of("/v10/x") == "native"
    assert surface_of("/api/tags") == "native"


def test_param_is_carried() -> None:
    body = json.loads(error_body("openai", 400, "invalid_request", "bad", param="model"))
    assert body["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_anthropic_body_has_its_type_by_status(status: int, kind: str) -> None:
    body = json.loads(error_body("/v1/messages", status, "whatever", "m"))
    assert body == {"type": "error", "error": {"type": kind, "message": "m"}}
    assert json.loads(error_body("anthropic", status, "x", "m")) == body


def test_messages_paths_are_anthropic() -> None:
    assert surface_of("/v1/messages") == "anthropic"
    assert surface_of("/v1/messages/count_tokens") == "anthropic"
    assert surface_of("/v1/messagesx") == "openai"
