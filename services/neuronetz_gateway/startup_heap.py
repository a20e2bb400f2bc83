"""A worker's startup heap, exempted from the cyclic GC's full collections.

Both services call :func:`freeze_startup_heap` as an ``on_startup`` hook of
``create_app_from_env`` (what Granian runs in each worker): Litestar runs
those after the lifespan has wired everything (pools, clients, the audit
writer and its journal, the revocation watch), so what the worker keeps for
its life is built by then.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Exempt what the worker built at startup from the cyclic GC's full collections.

    Litestar, asyncpg, redis-py, aiohttp, prometheus_client and our wiring
    leave a few hundred thousand long-lived objects; every full (generation
    2) collection walked them all: 60-90 ms with the event loop stopped,
    under load every few seconds (in-flight requests promoted at each
    generation-1 collection trigger them), i.e. the p99 of ``/authorize``
    and of a proxied stream. Frozen objects are still freed by reference
    counting; only cycles among them are never collected, and startup
    objects live as long as the worker anyway. Objects made later (each
    request's, pool connections opened on demand) are collected as before.
    """
    gc.collect()
    gc.freeze()
