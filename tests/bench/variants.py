"""What is compared: each variant is a URL, a surface and the processes it costs.

Like is compared with like:

- ``simulator`` (the floor) and ``caddy`` (Caddy alone) are hit on the
  simulator's native ``POST /api/chat``;
- the full gateway twice: ``gateway_native`` on ``/api/chat`` (passthrough;
  its ratio is taken against ``caddy``) and ``gateway_openai`` on
  ``/v1/chat/completions`` (translated to native and back; its ratio is
  taken against ``litellm``, which speaks only OpenAI);
- ``litellm`` on ``/v1/chat/completions``.
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

Surface = Literal["native", "openai"]
PROMPT = "Say hello to the benchmark in a few words."
MODEL = "llama3.2"


def chat_body(surface: Surface, *, stream: bool, model: str = MODEL) -> bytes:
    """A small chat request; streaming or not. Same prompt on both surfaces."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
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

    @property
    def path(self) -> str:
        """The request path on this variant's surface."""
        return "/api/chat" if self.surface == "native" else "/v1/chat/completions"

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
        auth="litellm", model=LITELLM_MODEL,
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
