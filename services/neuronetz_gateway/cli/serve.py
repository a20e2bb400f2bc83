"""``neuronetz-gateway serve auth|proxy``: run a service under Granian.

Settings are validated here first, so a wrong variable is reported by name
before any worker starts. Each service module exposes
``create_app_from_env()``, which Granian calls as a factory in every worker.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from neuronetz_gateway.logging import configure_logging
from neuronetz_gateway.settings import (
    SettingsError,
    check_spool_dir,
    load_settings,
    secret_warnings,
)
from neuronetz_gateway.tracing import TracingConfigError, check_tracing_env

__all__ = ["Service", "granian_options", "serve"]


class Service(StrEnum):
    auth = "auth"
    proxy = "proxy"


_TARGETS = {
    Service.auth: "neuronetz_gateway.auth.app:create_app_from_env",
    Service.proxy: "neuronetz_gateway.proxy.app:create_app_from_env",
}


def serve(
    service: Annotated[Service, typer.Argument(help="Which service: auth or proxy.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to bind (0: auth 8081, proxy 8082).")
    ] = 0,
    workers: Annotated[
        int, typer.Option("--workers", help="Worker processes (one per container is best).")
    ] = 1,
) -> None:
    """Serve the auth decision service or the streaming proxy with Granian (ASGI)."""
    try:
        settings = load_settings()
        if service is Service.proxy:
            check_spool_dir(settings.audit_spool_dir)
        check_tracing_env()
    except (SettingsError, TracingConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if workers < 1:
        typer.echo("error: --workers must be at least 1", err=True)
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)
    for warning in secret_warnings(settings):
        typer.echo(f"warning: {warning}", err=True)
    from granian import Granian

    Granian(
        _TARGETS[service],
        address=host,
        port=port or (8081 if service is Service.auth else 8082),
        **granian_options(workers),
    ).serve()


def granian_options(workers: int = 1) -> dict[str, Any]:
    """How both services are served (the benchmark's yardsticks are served the same way)."""
    from granian.constants import Interfaces

    return {
        "interface": Interfaces.ASGI,
        "workers": workers,
        "factory": True,
        "log_access": False,
        "backlog": 2048,
    }
