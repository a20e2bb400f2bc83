"""``python -m neuronetz_gateway.simulator``: serve the simulator with Granian.

Options are passed to the app through the ``NZ_SIM_*`` environment, because
Granian builds the app inside its worker processes from the factory; each
flag's destination is the config field it sets (the table
:data:`~neuronetz_gateway.simulator.app.ENVIRONMENT`, which the app reads).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from neuronetz_gateway.simulator.app import ENVIRONMENT

__all__ = ["main"]

_TARGET = "neuronetz_gateway.simulator.app:create_simulator_app"


def _number(kind: type[float], *, low: float, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


_positive_int = _number(int, low=1, inclusive=True)
_non_negative_int = _number(int, low=0, inclusive=True)
_positive_float = _number(float, low=0, inclusive=False)
_non_negative_float = _number(float, low=0, inclusive=True)


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
        "--no-record",
        dest="record",
        action="store_const",
        const="0",
        help="do not record requests (for benchmarks)",
    )
    gpu = parser.add_argument_group("the GPU (see neuronetz_gateway.simulator.gpu)")
    gpu.add_argument(
        "--slots",
        type=_positive_int,
        help="parallel requests per loaded model, OLLAMA_NUM_PARALLEL (NZ_SIM_SLOTS; default none)",
    )
    gpu.add_argument(
        "--max-queue",
        type=_non_negative_int,
        help="requests that may wait, OLLAMA_MAX_QUEUE; then 503 (NZ_SIM_MAX_QUEUE, default 512)",
    )
    gpu.add_argument(
        "--tokens-per-second",
        type=_positive_float,
        help="generation speed, one chunk a token; replaces --chunk-delay-ms",
    )
    gpu.add_argument(
        "--load-seconds",
        type=_non_negative_float,
        help="how long a model that is not loaded takes to load (NZ_SIM_LOAD_SECONDS, default 0)",
    )
    gpu.add_argument(
        "--max-loaded",
        type=_positive_int,
        help="models loaded at once, OLLAMA_MAX_LOADED_MODELS; the idlest is evicted",
    )
    gpu.add_argument("--loaded", help="comma-separated models loaded at start-up (NZ_SIM_LOADED)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def _environment(args: argparse.Namespace) -> dict[str, str]:
    """The ``NZ_SIM_*`` variables the given flags set."""
    return {
        variable: str(value)
        for field, (variable, _) in ENVIRONMENT.items()
        if (value := getattr(args, field)) is not None
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options and serve until interrupted."""
    args = _parser().parse_args(argv)
    os.environ.update(_environment(args))

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
