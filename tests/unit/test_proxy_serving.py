"""How the proxy service's worker is set up to serve: its heap after startup."""

from __future__ import annotations

import pytest

from neuronetz_gateway import startup_heap
from neuronetz_gateway.auth import app as auth_app
from neuronetz_gateway.proxy import app as proxy_app
from neuronetz_gateway.settings import load_settings


def test_the_worker_freezes_its_startup_heap_after_the_lifespan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NZ_GATEWAY_SECRET", "s" * 40)
    monkeypatch.setattr(proxy_app, "configure_logging", lambda *_: None)
    app = proxy_app.create_app_from_env()
    # an on_startup hook: Litestar runs those after the lifespan (pools, audit writer,
    # journals, watches) is entered; the last one, so nothing a hook builds stays collected
    assert app.on_startup[-1] is startup_heap.freeze_startup_heap


def test_an_app_built_by_hand_leaves_the_callers_heap_alone() -> None:
    # tests (and embedders) build apps in their own process: no freeze of theirs
    app = proxy_app.create_app(load_settings({"NZ_GATEWAY_SECRET": "s" * 40}))
    assert startup_heap.freeze_startup_heap not in app.on_startup


def test_both_services_freeze_with_the_one_shared_hook() -> None:
    assert auth_app.freeze_startup_heap is startup_heap.freeze_startup_heap
