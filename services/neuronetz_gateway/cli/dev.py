"""``neuronetz-gateway dev``: the whole gateway on this machine, one command, no Docker.

Ctrl-C (SIGINT) or SIGTERM stops everything it started, in order, and deletes
the throwaway data. The handlers only set a flag, so a signal never cuts a
start-up step in half (a half-made Postgres cluster would be left behind).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from neuronetz_gateway.devstack.processes import ProcessDied, StartupTimeout
from neuronetz_gateway.devstack.servers import MissingDependency
from neuronetz_gateway.devstack.stack import (
    DEFAULT_CADDY_PORT,
    DEMO_TENANT,
    DevStack,
    DevStackOptions,
    StackInfo,
)

__all__ = ["dev", "usage_text"]


def _say(message: str) -> None:
    typer.echo(f"[dev] {message}", err=True)


def usage_text(info: StackInfo) -> str:
    """What the user sees once the stack is up: URL, key, a curl line, an openai snippet."""
    body = f'{{"model": "{info.model}", "messages": [{{"role": "user", "content": "Say hello"}}]}}'
    lines = [
        "",
        f"neuronetz-gateway is up at {info.url}",
        f"Ollama: {info.ollama_url}"
        + ("  (the bundled SIMULATOR, not a real model)" if info.using_simulator else ""),
        "",
        f"demo key (tenant {DEMO_TENANT!r}, shown once): {info.key}",
        "",
        "try it:",
        f"  curl -sS {info.url}/v1/chat/completions \\",
        f"    -H 'Authorization: Bearer {info.key}' \\",
        "    -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "",
        "or with the openai client (pip install openai):",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{info.url}/v1", api_key="{info.key}")',
        "  reply = client.chat.completions.create(",
        f'      model="{info.model}", messages=[{{"role": "user", "content": "Say hello"}}]',
        "  )",
        "  print(reply.choices[0].message.content)",
        "",
        *(
            [
                f"backends ({len(info.backends)} simulated GPUs, see `backend list`):",
                *(
                    f"  {b.name}  {b.url}  {', '.join(b.models)}  (warm: {b.loaded})"
                    for b in info.backends
                ),
                "",
            ]
            if info.backends
            else []
        ),
        f"logs: {info.state_dir / 'logs'} (deleted on exit)",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    return "\n".join(lines)


def dev(
    port: Annotated[
        int, typer.Option("--port", help="Port for Caddy, the gateway's front door.")
    ] = DEFAULT_CADDY_PORT,
    simulator: Annotated[
        bool,
        typer.Option(
            "--simulator", help="Use the bundled Ollama simulator even if an Ollama answers."
        ),
    ] = False,
    caddyfile: Annotated[
        Path | None,
        typer.Option("--caddyfile", help="Caddyfile to use (default: the repository's)."),
    ] = None,
    backends: Annotated[
        int,
        typer.Option(
            "--backends",
            min=0,
            max=16,
            help="Start N simulators (GPUs with different models) as the fleet's backends.",
        ),
    ] = 0,
) -> None:
    """Run the whole gateway locally: Postgres, Redis, auth, proxy, Caddy, Ollama or a simulator."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if not stop_requested.is_set():
            _say(f"{signal.Signals(signum).name}: stopping")
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    stack = DevStack(
        DevStackOptions(
            caddy_port=port, force_simulator=simulator, caddyfile=caddyfile, backends=backends
        ),
        os.environ,
        say=_say,
        should_stop=stop_requested.is_set,
    )
    failure: str | None = None
    try:
        info = stack.start()
        typer.echo(usage_text(info))
        while not stop_requested.wait(0.5):
            stack.check_alive()
    except InterruptedError:
        pass
    except (MissingDependency, ProcessDied, StartupTimeout, FileNotFoundError) as exc:
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - report in one line, then clean up
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)
    _say("stopped")
