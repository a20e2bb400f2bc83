"""The upstream client: one pooled aiohttp session per process, talking to Ollama.

Chosen by measurement (``tests/bench/bench_upstream_clients.py``): under 32
concurrent streams aiohttp relays several times faster than httpx's pooled
``AsyncClient`` on this kind of machine. Everything aiohttp stays in this
module; the proxy sees :class:`UpstreamResponse` and the error tree::

    UpstreamError
    ├── UpstreamUnavailable   connection refused / reset before an answer
    └── UpstreamTimeout       connect or read timeout (a model that never answers)

Timeouts are explicit: connect ``upstream_connect_timeout_seconds``, and a
read timeout between bytes (not for the whole answer) long enough for a
model to load (``upstream_read_timeout_seconds``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

if TYPE_CHECKING:
    from neuronetz_gateway.domain.model_call import ModelCall

__all__ = [
    "OllamaClient",
    "OllamaUpstream",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "public_address",
]

_USER_AGENT = "neuronetz-gateway"
_BASE_HEADERS = {
    "user-agent": _USER_AGENT,
    "accept": "application/json, application/x-ndjson",
    # Streams must not be held back by a compressor on either side.
    "accept-encoding": "identity",
}
_JSON_HEADERS = {**_BASE_HEADERS, "content-type": "application/json"}


class UpstreamError(Exception):
    """Ollama could not be reached or did not answer in time."""


class UpstreamUnavailable(UpstreamError):
    """The connection failed or broke."""


class UpstreamTimeout(UpstreamError):
    """Connect or read timeout."""


class UpstreamResponse:
    """An answer from Ollama whose body is read (or streamed) by the caller.

    Always finish with :meth:`release` (body consumed, connection reused) or
    :meth:`abort` (connection closed, so Ollama sees the cancel).
    """

    __slots__ = ("_response", "backend")

    def __init__(self, response: aiohttp.ClientResponse, backend: str = "") -> None:
        self._response = response
        self.backend = backend  # scheme://host:port of the server that answered

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def content_type(self) -> str:
        return self._response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        """The whole body."""
        try:
            return await self._response.read()
        except TimeoutError:
            raise UpstreamTimeout("upstream read timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream connection broke: {type(exc).__name__}") from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one network read at a time (no re-chunking)."""
        content = self._response.content
        while True:
            try:
                data = await content.readany()
            except TimeoutError:
                raise UpstreamTimeout("upstream read timed out") from None
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(
                    f"upstream connection broke: {type(exc).__name__}"
                ) from None
            if not data:
                return
            yield data

    def release(self) -> None:
        """Done with a fully read body: the connection goes back to the pool."""
        self._response.release()

    def abort(self) -> None:
        """Close the connection now (a cancelled request must stop the model)."""
        self._response.close()


class OllamaClient:
    """The process's one upstream session; :meth:`open` in the lifespan, :meth:`close` after."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int = 1024,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.address = public_address(self.base_url)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the pooled session (inside the running event loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OllamaClient.open() was not called")
        return self._session

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        request_id: str | None = None,
        traceparent: str | None = None,
        limit_seconds: float | None = None,
    ) -> UpstreamResponse:
        """Send a request to ``path`` (fixed upstream path) and return once headers arrive."""
        session = self._require_session()
        headers = _JSON_HEADERS if body is not None else _BASE_HEADERS
        if request_id is not None:
            headers = {**headers, "x-request-id": request_id}
        if traceparent is not None:  # tracing on: Ollama (or what fronts it) joins the trace
            headers = {**headers, "traceparent": traceparent}
        kwargs = {}
        if limit_seconds is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=limit_seconds)
        try:
            response = await session.request(
                method,
                self.base_url + path,
                data=body,
                headers=headers,
                allow_redirects=False,
                **kwargs,  # type: ignore[arg-type]
            )
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from None
        return UpstreamResponse(response, self.address)

    async def fetch(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        limit_seconds: float | None = None,
    ) -> tuple[int, bytes]:
        """Send and read the whole answer: ``(status, body)``."""
        response = await self.send(method, path, body, limit_seconds=limit_seconds)
        try:
            data = await response.read()
        except BaseException:
            response.abort()
            raise
        response.release()
        return response.status, data

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        """Whether Ollama answers ``GET /api/version`` within ``limit_seconds``."""
        try:
            status, _ = await self.fetch("GET", "/api/version", limit_seconds=limit_seconds)
        except (UpstreamError, TimeoutError):
            return False
        return status == 200


def public_address(base_url: str) -> str:
    """``scheme://host:port`` of ``base_url``, without credentials or path."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


class OllamaUpstream:
    """The proxy's :class:`~neuronetz_gateway.proxy.ports.Upstream` with one Ollama server.

    Every call goes to the one ``NZ_OLLAMA_URL`` client, whatever its model,
    tenant or session (a backend pool, SPEC section 12, implements the same port).
    """

    __slots__ = ("client", "name")

    def __init__(self, client: OllamaClient, name: str = "default") -> None:
        self.client = client
        self.name = name  # the backend's name in the metrics

    async def open(self, call: ModelCall, path: str, body: bytes | None) -> UpstreamResponse:
        """``POST`` ``body`` (``GET`` without one) to ``path``; the answer once headers are in."""
        if call.on_sent is not None:
            call.on_sent(self.name)
        return await self.client.send(
            "GET" if body is None else "POST",
            path,
            body,
            request_id=call.request_id,
            traceparent=call.traceparent,
        )

    async def ping(self, limit_seconds: float = 2.0) -> bool:
        """Whether Ollama answers ``GET /api/version``."""
        return await self.client.ping(limit_seconds)
