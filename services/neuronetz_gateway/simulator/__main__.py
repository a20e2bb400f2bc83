"""``python -m neuronetz_gateway.simulator``: serve the simulator with Granian.

Options are passed to the app through the ``NZ_SIM_*`` environment, because
Granian builds the app inside its worker processes from the factory.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

__all__ = ["main"]

_TARGET = "neuronetz_gateway.simulator.app:create_simulator_app"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m neuronetz_gateway.simulator",
        description="Serve the bundled Ollama simulator (deterministic, for dev/tests/bench).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=11434, help="port (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--chunks", type=int, help="chunks per answer (NZ_SIM_CHUNKS, default 20)")
    parser.add_argument(
        "--chunk-delay-ms", type=float, help="delay before each chunk (NZ_SIM_CHUNK_DELAY_MS)"
    )
    parser.add_argument("--models", help="comma-separated model names (NZ_SIM_MODELS)")
    parser.add_argument(
        "--no-record", action="store_true", help="do not record requests (for benchmarks)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options and serve until interrupted."""
    args = _parser().parse_args(argv)
    if args.chunks is not None:
        os.environ["NZ_SIM_CHUNKS"] = str(args.chunks)
    if args.chunk_delay_ms is not None:
        os.environ["NZ_SIM_CHUNK_DELAY_MS"] = str(args.chunk_delay_ms)
    if args.models is not None:
        os.environ["NZ_SIM_MODELS"] = args.models
    if args.no_record:
        os.environ["NZ_SIM_RECORD"] = "0"

    # Imported here so that importing the package (tests, the CLI) stays cheap.
    from granian import Granian
    from granian.constants import Interfaces

    Granian(
        _TARGET,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        factory=True,
        log_access=args.access_log,
    ).serve()


if __name__ == "__main__":
    main()
