"""The ceiling for ``/authorize``: a Litestar handler that decides nothing.

Served exactly as ``neuronetz-gateway serve auth`` serves the auth service
(Granian, ASGI, one worker, the same backlog, no access log), so the ratio
``/authorize`` ÷ this handler is the cost of the decision itself.
Run: ``python -m tests.bench.trivial_app --port P``.
"""

from __future__ import annotations

import argparse

from litestar import Litestar, Response, get

__all__ = ["create_app", "main"]

_IDENTITY = "v1.e30.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@get("/authorize", sync_to_thread=False)
def authorize() -> Response[None]:
    """Allow everything, with a header the size of a real identity token's signature."""
    return Response(None, status_code=200, headers={"X-NZ-Identity": _IDENTITY})


def create_app() -> Litestar:
    """The app Granian builds in its worker."""
    return Litestar(route_handlers=[authorize], openapi_config=None, logging_config=None)


def main() -> None:
    """Serve on 127.0.0.1 with the auth service's Granian settings."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.trivial_app")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from granian import Granian

    from neuronetz_gateway.cli.serve import granian_options

    Granian(
        "tests.bench.trivial_app:create_app", address="127.0.0.1", port=args.port,
        **granian_options(),
    ).serve()  # fmt: skip


if __name__ == "__main__":
    main()
