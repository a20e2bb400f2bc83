"""In-memory fakes of the proxy's and auth's ports, for unit tests only.

Integration and e2e tests use the real Redis, Postgres and the simulator;
these stand in for them where a test is about the steps, not the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec

from neuronetz_gateway.domain.accounting import AuditRow, PromptRow
from neuronetz_gateway.domain.identity import Allowance, Identity, Limits, sign_identity
from neuronetz_gateway.domain.limits import Decision
from neuronetz_gateway.domain.model_call import ModelCall
from neuronetz_gateway.proxy.context import ProxyContext
from neuronetz_gateway.proxy.discovery import Catalogue
from neuronetz_gateway.proxy.metrics import ProxyMetrics
from neuronetz_gateway.proxy.ports import IdentityReplayed, LimiterUnavailable, UpstreamError
from neuronetz_gateway.settings import Secret, Settings

SECRET = b"unit-test-secret-" + b"x" * 32
NOW = 1_900_000_000.0


class FakeStream:
    """A scripted upstream answer: its status, content type and reads."""

    def __init__(
        self,
        reads: Sequence[bytes],
        *,
        status: int = 200,
        content_type: str = "application/x-ndjson",
        fail_after: bool = False,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.backend = "http://gpu1.internal:11434"
        self._reads = list(reads)
        self._fail_after = fail_after  # the connection breaks after the last read
        self._hold = hold  # a read waits for this before ending (a slow model)
        self.aborted = False
        self.released = False

    async def read(self) -> bytes:
        return b"".join(self._reads)

    async def chunks(self) -> AsyncIterator[bytes]:
        for data in self._reads:
            if self.aborted:
                raise UpstreamError("aborted")
            yield data
        if self._hold is not None:
            await self._hold.wait()
            if self.aborted:
                raise UpstreamError("aborted")
        if self._fail_after:
            raise UpstreamError("connection reset")

    def release(self) -> None:
        self.released = True

    def abort(self) -> None:
        self.aborted = True
        if self._hold is not None:
            self._hold.set()


@dataclass
class FakeUpstream:
    """Answers each :meth:`open` with the next scripted stream and records the call."""

    streams: list[FakeStream] = field(default_factory=list)
    calls: list[tuple[ModelCall, str, bytes | None]] = field(default_factory=list)
    unavailable: bool = False
    backend: str = "default"  # the name it gives the call's ``on_sent``

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> FakeStream:
        self.calls.append((call, path, body))
        if call.on_sent is not None:
            call.on_sent(self.backend)
        if self.unavailable:
            raise UpstreamError("connection refused")
        return self.streams.pop(0)

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        return not self.unavailable

    def bodies(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(body) for _, _, body in self.calls if body is not None]


@dataclass
class QueueingUpstream(FakeUpstream):
    """An upstream whose every call waits for a slot, as the pool does when all are held.

    ``open`` reports the call queued (``ModelCall.on_queued``), then waits for
    ``grant``: then it answers the next scripted stream, or raises ``refusal``
    (a queue timeout). ``waiting`` counts the calls waiting now, ``cancelled``
    those whose wait was cancelled (a client that left frees its place).
    """

    grant: asyncio.Event = field(default_factory=asyncio.Event)
    refusal: Exception | None = None
    waiting: int = 0
    cancelled: int = 0

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> FakeStream:
        self.calls.append((call, path, body))
        if call.on_queued is not None:
            call.on_queued()
        self.waiting += 1
        try:
            await self.grant.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.waiting -= 1
        if self.refusal is not None:
            raise self.refusal
        if call.on_sent is not None:
            call.on_sent(self.backend)
        return self.streams.pop(0)


@dataclass
class FakeLimiter:
    """Records reservations and settlements; refuses what ``refuse`` names."""

    refuse: Decision | None = None
    claimed: set[str] = field(default_factory=set)
    reserved: list[int] = field(default_factory=list)
    settled: list[tuple[int, int]] = field(default_factory=list)  # (reserved, actual)
    released: list[str] = field(default_factory=list)
    settle_failures: int = 0  # the next this many settles raise LimiterUnavailable
    settle_attempts: list[str | None] = field(default_factory=list)  # reservation ids
    settle_audited_at: list[float | None] = field(default_factory=list)  # per attempt

    def _claim(self, request_id: str) -> None:
        if request_id in self.claimed:
            raise IdentityReplayed(request_id)
        self.claimed.add(request_id)

    async def claim_identity(self, *, tenant_id: int, request_id: str, expires_at_ms: int) -> None:
        self._claim(request_id)

    async def reserve(
        self,
        *,
        tenant_id: int,
        key_id: int,
        key_limits: Limits,
        tenant_limits: Limits,
        request_id: str,
        tokens: int,
        single_use_until_ms: int | None = None,
    ) -> Decision:
        if single_use_until_ms is not None:
            self._claim(request_id)
        if self.refuse is not None:
            return self.refuse
        self.reserved.append(tokens)
        return Decision(allowed=True, allowance=Allowance(remaining_tokens=1000 - tokens))

    async def settle(
        self,
        *,
        tenant_id: int,
        key_id: int,
        reserved: int,
        actual: int,
        reserved_at: float,
        key_limits: Limits | None = None,
        tenant_limits: Limits | None = None,
        release_lease_id: str | None = None,
        reservation_id: str | None = None,
        audited_at: float | None = None,
    ) -> Allowance:
        self.settle_attempts.append(reservation_id)
        self.settle_audited_at.append(audited_at)
        if self.settle_failures > 0:
            self.settle_failures -= 1
            raise LimiterUnavailable("redis failed: ConnectionError")
        self.settled.append((reserved, actual))
        if release_lease_id is not None:
            self.released.append(release_lease_id)
        return Allowance()

    async def renew_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None:
        return None

    async def release_lease(self, *, tenant_id: int, key_id: int, lease_id: str) -> None:
        self.released.append(lease_id)

    async def ping(self) -> bool:
        return True


@dataclass
class FakeAudit:
    rows: list[AuditRow | PromptRow] = field(default_factory=list)

    def submit(self, row: AuditRow | PromptRow) -> None:
        self.rows.append(row)

    def audit_rows(self) -> list[AuditRow]:
        return [r for r in self.rows if isinstance(r, AuditRow)]


class FakeCatalogue:
    """A fixed ``/api/tags``."""

    def __init__(self, *names: str) -> None:
        self._catalogue = Catalogue({n: {"name": n, "model": n} for n in names})
        self.forgotten = 0

    async def catalogue(self) -> Catalogue:
        return self._catalogue

    def forget(self) -> None:
        self.forgotten += 1


@dataclass
class Proxy:
    """A :class:`ProxyContext` on fakes, and helpers to call a route on it."""

    upstream: FakeUpstream = field(default_factory=FakeUpstream)
    limiter: FakeLimiter = field(default_factory=FakeLimiter)
    audit: FakeAudit = field(default_factory=FakeAudit)
    catalogue: FakeCatalogue = field(default_factory=lambda: FakeCatalogue("llama3.2:latest"))
    settings: Settings = field(default_factory=lambda: Settings(gateway_secret=Secret("u" * 48)))

    def __post_init__(self) -> None:
        self.ctx = ProxyContext(
            settings=self.settings,
            secret=SECRET,
            upstream=self.upstream,
            limiter=self.limiter,
            discovery=self.catalogue,
            audit=self.audit,
            metrics=ProxyMetrics(),
            clock=lambda: NOW,
        )
        self.app = SimpleNamespace(state=SimpleNamespace(proxy=self.ctx))

    def identity(self, route: str, **fields: Any) -> str:
        identity = Identity(
            request_id=fields.pop("request_id", "r" * 32),
            tenant_id=7,
            tenant_name="acme",
            key_id=11,
            key_prefix="nz_abcdefgh",
            route=route,
            expires_at_ms=int(NOW * 1000) + 30_000,
            **fields,
        )
        return sign_identity(identity, SECRET)

    def scope(
        self, method: str, path: str, token: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> dict[str, Any]:
        return {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(b"x-nz-identity", token.encode()), *headers],
            "app": self.app,
        }


class Client:
    """The ASGI client side: one request body, then (optionally) a disconnect."""

    def __init__(
        self, body: bytes, *, leave_after_start: bool = False, leave: asyncio.Event | None = None
    ) -> None:
        self._body = body
        self._sent_body = False
        self._leave = leave_after_start
        self._leave_now = leave  # the client leaves once this is set
        self._started = asyncio.Event()
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.parts: list[bytes] = []
        self.ended = False

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        if self._leave_now is not None:
            await self._leave_now.wait()
            return {"type": "http.disconnect"}
        if self._leave:
            await self._started.wait()
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a client that stays: never returns
        raise AssertionError("unreachable")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
            return
        self.parts.append(message.get("body", b""))
        if self._leave:
            self._started.set()
        if not message.get("more_body"):
            self.ended = True

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    def json(self) -> Any:
        return msgspec.json.decode(self.body)
