"""What is compared: each variant is a URL, a surface and the processes it costs.

Like is compared with like:

- ``simulator`` (the floor) and ``caddy`` (Caddy alone) are hit on the
  simulator's native ``POST /api/chat``;
- the full gateway twice: ``gateway_native`` on ``/api/chat`` (passthrough;
  its ratio is taken against ``caddy``) and ``gateway_openai`` on
  ``/v1/chat/completions`` (translated to native and back; its ratio is
  taken against ``litellm``, which speaks only OpenAI);
- ``litellm`` on ``/v1/chat/completions``;
- ``bare_chain`` (:mod:`tests.bench.bare_chain`): the same Caddy with a
  minimal auth and a passthrough proxy, on ``/api/chat``: the yardstick
  both gateway variants are divided by (the bare chain translates nothing,
  so ``gateway_openai`` ÷ it includes translation among the features;
  streams only: what the headline is about);
- ``gateway_anthropic`` (``/v1/messages``) and ``gateway_responses``
  (``/v1/responses``): the newer surfaces, compared with ``gateway_openai``
  (streams at concurrency 32 only: what their target is about).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiohttp

from tests.bench.litellm_peer import LITELLM_MASTER_KEY, LITELLM_MODEL
from tests.bench.loadgen import HttpTarget

__all__ = [
    "CHAT_VARIANTS",
    "PROMPT",
    "Variant",
    "authorize_headers",
    "chat_body",
    "probe",
]

Surface = Literal["native", "openai", "anthropic", "responses"]
PROMPT = "Say hello to the benchmark in a few words."
MODEL = "llama3.2"


_PATHS: dict[str, str] = {
    "native": "/api/chat",
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "responses": "/v1/responses",
}
#: (workload, concurrency) cells of the chat matrix
Cell = tuple[str, int]


def chat_body(surface: Surface, *, stream: bool, model: str = MODEL) -> bytes:
    """A small chat request; streaming or not. Same prompt on every surface."""
    body: dict[str, object] = {"model": model, "stream": stream}
    if surface == "responses":
        body["input"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    if surface == "anthropic":  # required there; far above the simulator's 20 chunks
        body["max_tokens"] = 256
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of reaching the simulator."""

    id: str
    label: str
    url_key: str  # which BenchStack URL it uses
    surface: Surface
    #: Services whose CPU time is charged to this variant (the simulator is reported apart).
    services: tuple[str, ...]
    auth: str = ""  # "gateway" or "litellm": which key goes in Authorization
    model: str = MODEL
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    #: The matrix cells it is measured in (None: all of them).
    cells: frozenset[Cell] | None = None
    #: Whether the streaming-fidelity test times it too.
    fidelity: bool = True
    #: Cell length at concurrency 32 in units of the configured one (LiteLLM: a request
    #: there takes seconds, so a short cell completes too few of them to count).
    long_cells: float = 1.0

    @property
    def path(self) -> str:
        """The request path on this variant's surface."""
        return _PATHS[self.surface]

    def measures(self, workload: str, concurrency: int) -> bool:
        """Whether the matrix runs this variant in that cell."""
        return self.cells is None or (workload, concurrency) in self.cells

    def target(self, urls: Mapping[str, str], gateway_key: str, *, stream: bool) -> HttpTarget:
        """The chat request for this variant."""
        headers = {"Content-Type": "application/json", **self.extra_headers}
        if self.auth == "gateway":
            headers["Authorization"] = f"Bearer {gateway_key}"
        elif self.auth == "litellm":
            headers["Authorization"] = f"Bearer {LITELLM_MASTER_KEY}"
        return HttpTarget(
            url=urls[self.url_key] + self.path,
            method="POST",
            headers=headers,
            body=chat_body(self.surface, stream=stream, model=self.model),
        )


_GATEWAY_SERVICES = ("caddy_gateway", "auth", "proxy", "redis", "postgres")
_BARE_SERVICES = ("caddy_bare", "bare_auth", "bare_proxy", "redis")
_STREAMS_32 = frozenset({("stream", 32)})

CHAT_VARIANTS: tuple[Variant, ...] = (
    Variant("simulator", "simulator direct (floor), /api/chat", "simulator", "native", ()),
    Variant(
        "caddy", "Caddy reverse_proxy -> simulator, /api/chat", "caddy_direct", "native",
        ("caddy_direct",),
    ),
    Variant(
        "gateway_native", "full gateway, /api/chat (native passthrough)", "gateway", "native",
        _GATEWAY_SERVICES, auth="gateway",
    ),
    Variant(
        "gateway_openai", "full gateway, /v1/chat/completions (translated)", "gateway", "openai",
        _GATEWAY_SERVICES, auth="gateway",
    ),
    Variant(
        "litellm", "LiteLLM proxy, /v1/chat/completions", "litellm", "openai", ("litellm",),
        auth="litellm", model=LITELLM_MODEL, long_cells=4.0,
    ),
    Variant(
        "bare_chain", "bare chain (yardstick): same Caddy, minimal auth + passthrough proxy, "
        "/api/chat", "bare", "native", _BARE_SERVICES, auth="gateway",
        cells=frozenset({("stream", 1), ("stream", 32)}),
    ),
    Variant(
        "gateway_anthropic", "full gateway, /v1/messages (Anthropic Messages, translated)",
        "gateway", "anthropic", _GATEWAY_SERVICES, auth="gateway", cells=_STREAMS_32,
        fidelity=False,
    ),
    Variant(
        "gateway_responses", "full gateway, /v1/responses (OpenAI Responses, translated)",
        "gateway", "responses", _GATEWAY_SERVICES, auth="gateway", cells=_STREAMS_32,
        fidelity=False,
    ),
)  # fmt: skip


def authorize_headers(key: str, host: str) -> dict[str, str]:
    """What Caddy's ``forward_auth`` sends to ``/authorize`` for a client's ``POST /api/chat``."""
    return {
        "Authorization": f"Bearer {key}",
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/api/chat",
        "X-Forwarded-Host": host,
        "X-Forwarded-Proto": "http",
        "X-Forwarded-For": "127.0.0.1",
        "Content-Type": "application/json",
    }


async def probe(
    session: aiohttp.ClientSession, target: HttpTarget, *, stream: bool, chunks: int
) -> str | None:
    """One request, checked: None when the answer is right, else what was wrong.

    A benchmark of error responses would be fast and meaningless, so every
    variant must first answer a real chat (and, streaming, every chunk).
    """
    try:
        async with session.request(
            target.method,
            target.url,
            headers=dict(target.headers),
            data=target.body,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            raw = await response.read()
            if response.status != 200:
                return f"HTTP {response.status}: {raw[:300].decode(errors='replace')}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    text = raw.decode(errors="replace")
    if not stream:
        return None if ("quick" in text) else f"no answer text in {text[:200]!r}"
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < chunks:
        return f"expected >= {chunks} stream lines, got {len(lines)}: {text[:200]!r}"
    return None
