"""The proxy's span for one request: GenAI semantic-convention attributes, no prompt, no key.

Named ``{gen_ai.operation.name} {gen_ai.request.model}`` for model calls
(``chat llama3.2:latest``), else after the route (``proxy tags``). The
attributes come from the audit row, which holds no text a client wrote
except the model name.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from neuronetz_gateway.domain.accounting import AuditRow

__all__ = ["OPERATIONS", "backend_address", "span_attributes", "span_name"]

#: gen_ai.operation.name by route id (model calls only)
OPERATIONS = {
    "chat": "chat",
    "v1.chat.completions": "chat",
    "v1.messages": "chat",  # Anthropic's Messages API
    "v1.responses": "chat",  # OpenAI's Responses API
    "generate": "text_completion",
    "v1.completions": "text_completion",
    "embed": "embeddings",
    "embeddings": "embeddings",
    "v1.embeddings": "embeddings",
}


def span_name(route: str, model: str | None) -> str:
    """``chat llama3.2:latest`` for a model call, ``proxy <route>`` for the rest."""
    operation = OPERATIONS.get(route)
    if operation is not None and model:
        return f"{operation} {model}"
    return f"proxy {route}"


def backend_address(base_url: str) -> tuple[str, int]:
    """Host and port of an upstream URL, without any credentials it may carry."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def span_attributes(
    row: AuditRow, *, surface: str, backend: tuple[str, int] | None, tenant: str
) -> dict[str, Any]:
    """What the span says about a finished request (``backend``: the one it reached, if any)."""
    attributes: dict[str, Any] = {
        "neuronetz.request_id": row.request_id,
        "neuronetz.route": row.route,
        "neuronetz.surface": surface,
        "neuronetz.tenant": tenant,
        "neuronetz.tenant.id": row.tenant_id,
        "neuronetz.key.id": row.key_id,
        "neuronetz.streamed": row.streamed,
        "neuronetz.client_disconnected": row.client_disconnected,
        "neuronetz.tokens_estimated": row.estimated,
    }
    if backend is not None:
        host, port = backend
        attributes["neuronetz.backend"] = f"{host}:{port}"
        attributes["server.address"] = host
        attributes["server.port"] = port
    if row.ttfb_ms is not None:
        attributes["neuronetz.ttfb_ms"] = row.ttfb_ms
    operation = OPERATIONS.get(row.route)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.provider.name"] = "ollama"
        attributes["gen_ai.system"] = "ollama"  # the name before semconv 1.37
        if row.model:
            attributes["gen_ai.request.model"] = row.model
        attributes["gen_ai.usage.input_tokens"] = row.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = row.completion_tokens
    return attributes
