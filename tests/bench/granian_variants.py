"""The auth service under other Granian settings than today's, to measure them against it.

Each variant is today's :func:`~neuronetz_gateway.cli.serve.granian_options`
with a few settings changed; the service is the real one
(``create_app_from_env``, same environment), so only Granian differs:

- ``http1``: HTTP/1 only (``http="1"``), no protocol detection per
  connection (Caddy and wrk speak HTTP/1.1 to it anyway);
- ``rust_tasks``: Granian's Rust task implementation instead of asyncio's
  (``task_impl="rust"``, Python < 3.12 only).

No ``backpressure`` variant: Granian's backpressure caps a worker's open
*connections*, idle keep-alive ones included, not its requests in flight
(session 21: with ``backpressure=16`` a 17th connection opened beside 16
idle ones gets no answer until one of them closes; a wrk run at 32
connections is served on 16 of them,
so its req/s and latencies were those of 16 connections, not comparable).

The RSGI interface cannot run the Litestar apps; it is priced on the bare
auth instead (:func:`tests.bench.bare_chain.create_auth_rsgi` vs
:func:`~tests.bench.bare_chain.create_auth_app`).

Run: ``python -m tests.bench.granian_variants VARIANT --port P`` with the
auth service's ``NZ_*`` environment.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["GRANIAN_VARIANTS", "main"]

#: variant -> what it changes (for the report)
GRANIAN_VARIANTS: dict[str, str] = {
    "http1": 'http="1" (HTTP/1 only)',
    "rust_tasks": 'task_impl="rust" (today: asyncio)',
}


def _overrides(variant: str) -> dict[str, Any]:
    from granian.constants import HTTPModes, TaskImpl

    overrides: dict[str, dict[str, Any]] = {
        "http1": {"http": HTTPModes.http1},
        "rust_tasks": {"task_impl": TaskImpl.rust},
    }
    return overrides[variant]


def main() -> None:
    """Serve the auth service on 127.0.0.1 with one variant's settings."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.granian_variants")
    parser.add_argument("variant", choices=sorted(GRANIAN_VARIANTS))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from granian import Granian

    from neuronetz_gateway.cli.serve import granian_options
    from neuronetz_gateway.logging import configure_logging
    from neuronetz_gateway.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    options = {**granian_options(), **_overrides(args.variant)}
    Granian(
        "neuronetz_gateway.auth.app:create_app_from_env",
        address="127.0.0.1",
        port=args.port,
        **options,
    ).serve()


if __name__ == "__main__":
    main()
