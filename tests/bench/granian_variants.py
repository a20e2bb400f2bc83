"""The auth service under other Granian settings than today's, to measure them against it.

Each variant is today's :func:`~neuronetz_gateway.cli.serve.granian_options`
with a few settings changed; the service is the real one
(``create_app_from_env``, same environment), so only Granian differs:

- ``http1``: HTTP/1 only (``http="1"``), no protocol detection per
  connection (Caddy and wrk speak HTTP/1.1 to it anyway);
- ``backpressure_16``: at most 16 requests in flight per worker (today: the
  backlog, 2048), the rest wait in the socket;
- ``rust_tasks``: Granian's Rust task implementation instead of asyncio's
  (``task_impl="rust"``, Python < 3.12 only).

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
    "backpressure_16": "backpressure=16 (today: 2048)",
    "rust_tasks": 'task_impl="rust" (today: asyncio)',
}


def _overrides(variant: str) -> dict[str, Any]:
    from granian.constants import HTTPModes, TaskImpl

    overrides: dict[str, dict[str, Any]] = {
        "http1": {"http": HTTPModes.http1},
        "backpressure_16": {"backpressure": 16},
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
