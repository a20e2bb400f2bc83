"""Models: allowed ∩ installed, one indistinguishable 403, filtered listings, option caps."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from neuronetz_gateway.domain.identity import OptionCaps
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.proxy_checks import new_ids
from tests.support.proxy_stack import DISCOVERY_TTL, ProxyServer, SimulatorServer

ALLOWED = ["llama3.2:latest", "not-installed:latest"]

pytest_plugins = ["tests.support.proxy_fixtures"]


def _chat(proxy: ProxyServer, model: str, **identity: object) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False},
        headers={IDENTITY_HEADER: signed("chat", **identity)},
    )


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_not_allowed_and_not_installed_get_identical_403(
    proxy: ProxyServer, sim: SimulatorServer, path: str
) -> None:
    route = "chat" if path == "/api/chat" else "v1.chat.completions"
    # one request id, so that the headers can be compared byte for byte; each
    # identity is single use per tenant, so each ask comes from another tenant
    request_id = f"req-same-{secrets.token_hex(4)}"

    def ask(allowed: list[str]) -> httpx.Response:
        token = signed(route, models=allowed, request_id=request_id, **new_ids())
        return httpx.post(
            f"{proxy.url}{path}",
            json={"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hi"}]},
            headers={IDENTITY_HEADER: token},
        )

    not_allowed = ask(["llama3.2:latest"])  # installed, but not this key's
    sim.configure(models=["llama3.2:latest"])
    time.sleep(DISCOVERY_TTL + 0.1)
    not_installed = ask(["llama3.2:latest", "qwen2.5:0.5b"])  # allowed, not installed
    # native: the one 403; /v1: OpenAI's one 404 model_not_found (issue 9)
    expected = 403 if path == "/api/chat" else 404
    assert not_allowed.status_code == not_installed.status_code == expected
    assert not_allowed.content == not_installed.content
    assert not_allowed.headers.keys() == not_installed.headers.keys()
    for name in not_allowed.headers:
        if name != "date":
            assert not_allowed.headers[name] == not_installed.headers[name], name
    assert sim.forwarded() == []


def test_canonical_spellings_are_the_same_model(proxy: ProxyServer, sim: SimulatorServer) -> None:
    for spelling in (
        "llama3.2",
        "LLAMA3.2:latest",
        "library/llama3.2",
        "registry.ollama.ai/library/llama3.2:latest",
    ):
        assert _chat(proxy, spelling, models=["llama3.2:latest"]).status_code == 200, spelling


def test_empty_discovery_denies_everything(proxy: ProxyServer, sim: SimulatorServer) -> None:
    sim.configure(models=[])
    time.sleep(DISCOVERY_TTL + 0.1)
    assert _chat(proxy, "llama3.2").status_code == 403


def test_listings_show_only_the_effective_set(proxy: ProxyServer, sim: SimulatorServer) -> None:
    models = ["llama3.2:latest", "nomic-embed-text:latest", "not-installed:latest"]
    tags = httpx.get(
        f"{proxy.url}/api/tags", headers={IDENTITY_HEADER: signed("tags", models=models)}
    ).json()
    assert [m["name"] for m in tags["models"]] == ["llama3.2:latest", "nomic-embed-text:latest"]

    v1 = httpx.get(
        f"{proxy.url}/v1/models", headers={IDENTITY_HEADER: signed("v1.models", models=models)}
    ).json()
    assert [m["id"] for m in v1["data"]] == ["llama3.2:latest", "nomic-embed-text:latest"]

    for model_id, status in (("llama3.2:latest", 200), ("qwen2.5:0.5b", 404), ("nope", 404)):
        reply = httpx.get(
            f"{proxy.url}/v1/models/{model_id}",
            headers={IDENTITY_HEADER: signed("v1.model", models=models)},
        )
        assert reply.status_code == status, model_id
        if status == 404:
            assert reply.json()["error"]["code"] == "model_not_found"  # as OpenAI answers
            assert reply.json()["error"]["type"] == "invalid_request_error"

    # load two models, then /api/ps lists only the allowed one
    for model in ("llama3.2", "qwen2.5:0.5b"):
        assert _chat(proxy, model).status_code == 200
    ps = httpx.get(f"{proxy.url}/api/ps", headers={IDENTITY_HEADER: signed("ps", models=models)})
    assert [m["name"] for m in ps.json()["models"]] == ["llama3.2:latest"]


def _native_options(sim: SimulatorServer) -> dict[str, object]:
    (seen,) = [r for r in sim.forwarded() if r["path"] == "/api/generate"]
    return dict(seen["body"])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_ctx": 99999, "num_predict": 5000}, {"num_ctx": 4096, "num_predict": 64}),
        ({"num_ctx": 1024, "num_predict": 10}, {"num_ctx": 1024, "num_predict": 10}),
        ({}, {"num_predict": 64}),
        ({"num_predict": -1}, {"num_predict": 64}),
    ],
)
def test_native_caps_clamp_num_ctx_and_num_predict(
    proxy: ProxyServer, sim: SimulatorServer, options: dict[str, int], expected: dict[str, int]
) -> None:
    caps = OptionCaps(max_num_ctx=4096, max_num_predict=64)
    reply = httpx.post(
        f"{proxy.url}/api/generate",
        json={"model": "llama3.2", "prompt": "hi", "stream": False, "options": options},
        headers={IDENTITY_HEADER: signed("generate", caps=caps)},
    )
    assert reply.status_code == 200, reply.text
    assert _native_options(sim)["options"] == expected


@pytest.mark.parametrize("keep_alive", [0, "0", "0s", -1, "-1", "-5m", "nonsense"])
def test_forbidden_keep_alive_is_refused_naming_the_option(
    proxy: ProxyServer, sim: SimulatorServer, keep_alive: object
) -> None:
    reply = httpx.post(
        f"{proxy.url}/api/generate",
        json={"model": "llama3.2", "prompt": "hi", "keep_alive": keep_alive},
        headers={IDENTITY_HEADER: signed("generate")},
    )
    assert reply.status_code == 400
    assert "keep_alive" in reply.json()["error"]
    assert sim.forwarded() == []


def test_keep_alive_allowed_when_the_key_may_override(
    proxy: ProxyServer, sim: SimulatorServer
) -> None:
    for value, caps in (("10m", OptionCaps()), (0, OptionCaps(allow_keep_alive_override=True))):
        reply = httpx.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "keep_alive": value, "stream": False},
            headers={IDENTITY_HEADER: signed("generate", caps=caps)},
        )
        assert reply.status_code == 200, reply.text


def test_openai_max_tokens_is_clamped(proxy: ProxyServer, sim: SimulatorServer) -> None:
    caps = OptionCaps(max_num_predict=5)
    for body in ({"max_tokens": 500}, {"max_completion_tokens": 500}, {}):
        sim.clear()
        reply = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **body},
            headers={IDENTITY_HEADER: signed("v1.chat.completions", caps=caps)},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        (seen,) = sim.forwarded()
        assert seen["body"]["options"]["num_predict"] == 5
