"""How the auth service's worker is set up to serve: its heap after startup."""

from __future__ import annotations

import gc

import pytest

from neuronetz_gateway.auth import app as auth_app


def test_the_worker_freezes_its_startup_heap_after_the_lifespan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NZ_GATEWAY_SECRET", "s" * 40)
    monkeypatch.setattr(auth_app, "configure_logging", lambda *_: None)
    app = auth_app.create_app_from_env()
    # an on_startup hook: Litestar runs those after the lifespan (the wiring) is entered
    assert auth_app.freeze_startup_heap in app.on_startup


def test_freezing_moves_the_live_objects_out_of_the_collected_generations() -> None:
    before = gc.get_freeze_count()
    try:
        auth_app.freeze_startup_heap()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
