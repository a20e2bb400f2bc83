"""The proxy's collaborators, shared by every request of one process."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.ollama_client import OllamaClient
from neuronetz_gateway.adapters.redis_limiter import Limiter
from neuronetz_gateway.proxy.discovery import ModelDiscovery
from neuronetz_gateway.proxy.metrics import ProxyMetrics
from neuronetz_gateway.proxy.running import RunningRequests
from neuronetz_gateway.settings import Settings
from neuronetz_gateway.tracing import Tracing

__all__ = ["ProxyContext"]


@dataclass(slots=True)
class ProxyContext:
    """Settings and open clients; built in the app's lifespan, read by the handlers."""

    settings: Settings
    secret: bytes
    ollama: OllamaClient
    limiter: Limiter
    discovery: ModelDiscovery
    audit: AuditWriter
    metrics: ProxyMetrics
    running: RunningRequests = field(default_factory=RunningRequests)
    tracing: Tracing | None = None  # None: tracing is off
    previous_secret: bytes | None = None  # NZ_GATEWAY_SECRET_PREVIOUS, still accepted
