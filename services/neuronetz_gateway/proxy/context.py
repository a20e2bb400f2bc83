"""The proxy's collaborators, shared by every request of one process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from neuronetz_gateway.proxy.metrics import ProxyMetrics
from neuronetz_gateway.proxy.ports import AuditSink, Clock, ModelCatalogue, TokenLimiter, Upstream
from neuronetz_gateway.proxy.running import RunningRequests
from neuronetz_gateway.proxy.settle_retry import SettleRetries
from neuronetz_gateway.settings import Settings
from neuronetz_gateway.tracing import Tracing

__all__ = ["ProxyContext"]


@dataclass(slots=True)
class ProxyContext:
    """Settings and the ports' implementations; built in the app's lifespan (the
    composition root), read by the handlers."""

    settings: Settings
    secret: bytes
    upstream: Upstream
    limiter: TokenLimiter
    discovery: ModelCatalogue
    audit: AuditSink
    metrics: ProxyMetrics
    running: RunningRequests = field(default_factory=RunningRequests)
    tracing: Tracing | None = None  # None: tracing is off
    previous_secret: bytes | None = None  # NZ_GATEWAY_SECRET_PREVIOUS, still accepted
    clock: Clock = time.time
    settle_retries: SettleRetries | None = None  # None: a failed settle is only logged
