"""The fleet's baseline: a plain round-robin passthrough over the same backends.

Not the gateway: no slots, no queue, no knowledge of what is loaded. Each
model request goes to the next backend, in turn, among those that have the
model installed (a round-robin pool per model, as a load balancer with one
upstream group per model would be set up; a round-robin over all three
would send a model to a backend that does not have it, a 404 no operator
would accept). The body is relayed as it arrives, the backend's status
(Ollama's 503 included) passed on unchanged.

Run: ``python -m tests.bench.round_robin --port P --backend URL=model,model ...``
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator

from aiohttp import ClientSession, ClientTimeout, web

from neuronetz_gateway.domain.models import canonical_model

__all__ = ["main", "make_app"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def _pools(backends: dict[str, list[str]]) -> dict[str, Iterator[str]]:
    by_model: dict[str, list[str]] = {}
    for url, models in backends.items():
        for model in models:
            by_model.setdefault(canonical_model(model), []).append(url)
    return {model: itertools.cycle(urls) for model, urls in by_model.items()}


def make_app(backends: dict[str, list[str]]) -> web.Application:
    """The passthrough: ``backends`` maps each base URL to the models installed there."""
    pools = _pools(backends)
    anyone = itertools.cycle(list(backends))
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["client"] = ClientSession(timeout=ClientTimeout(total=None, sock_connect=5))

    async def stop(app: web.Application) -> None:
        await app["client"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        model = ""
        if body:
            try:
                model = canonical_model(str(json.loads(body).get("model", "")))
            except (ValueError, AttributeError):
                model = ""
        if model:
            pool = pools.get(model)
            if pool is None:
                return web.json_response({"error": f"model '{model}' not found"}, status=404)
            base = next(pool)
        else:
            base = next(anyone)
        client: ClientSession = app["client"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with client.request(
            request.method, base + request.path_qs, data=body or None, headers=headers
        ) as upstream:
            answer = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP},
            )
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def _backend(text: str) -> tuple[str, list[str]]:
    url, _, models = text.partition("=")
    return url.rstrip("/"), [m for m in models.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=_backend, action="append", required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(dict(args.backend)), host="127.0.0.1", port=args.port, print=None,
        access_log=None,
    )  # fmt: skip


if __name__ == "__main__":
    main()
