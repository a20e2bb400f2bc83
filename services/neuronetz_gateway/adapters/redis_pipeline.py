"""A minimal pipelined Redis client for the limiter's hot path.

redis-py's asyncio client spends most of a limiter decision's CPU on its
command path (connection pool checkout, retry wrapper, packing, one
``send`` and one ``recv`` per command per connection). The limiter only ever
sends a handful of command shapes (``EVALSHA``, a ``SET NX``, ``PING``), so
this client keeps one persistent connection per process and pipelines
every caller's commands over it:

- commands issued in one event-loop iteration leave in one ``write``;
- replies are parsed by hiredis and handed to the waiting callers in order;
- every command is bounded by ``timeout_seconds`` (connecting included): past
  it the caller gets :class:`TimeoutError`, and the reply, when it comes, is
  dropped; so is the reply of a caller that gave up by itself;
- if Redis sends nothing for ``timeout_seconds`` while replies are owed, the
  connection is dropped and every waiting caller fails (Redis is hung or the
  network is gone); the next command reconnects;
- a lost connection fails every waiting caller at once; the next command
  reconnects (no retry loops: callers fail closed and ask again).

Errors are redis-py's, so callers handle one tree::

    TimeoutError          no answer within the timeout (the connection stays)
    redis.exceptions.RedisError
    ├── ConnectionError   no connection, connection lost, or Redis silent too long
    └── ResponseError     Redis answered with an error
        └── NoScriptError     EVALSHA of a script Redis does not have
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from neuronetz_gateway.adapters.redis_client import RedisClient

__all__ = ["PackedKeys", "PipelinedRedis", "RedisArg", "pack_evalsha"]

RedisArg = str | bytes | int | float

# hiredis's stub types the argument as a 1-tuple; it takes any tuple of arguments
_pack = cast(Callable[[tuple[RedisArg, ...]], bytes], hiredis.pack_command)


def _bulks(packed: bytes) -> bytes:
    """A packed command without its ``*<count>`` header: its arguments' bulk strings."""
    return packed[packed.index(b"\n") + 1 :]


class PackedKeys(list[str]):
    """Script KEYS that keep their RESP encoding, for lists built once and sent often.

    The limiter's key lists are the same for every decision of a key in a day;
    :func:`pack_evalsha` sends the stored bytes instead of encoding each name
    again. Not to be changed after it is made (the bytes would not follow).
    """

    __slots__ = ("packed",)

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys)
        self.packed = _bulks(_pack(tuple(keys))) if keys else b""


_SHA_HEADS: dict[tuple[str, int], bytes] = {}


def pack_evalsha(sha: str, keys: Sequence[RedisArg], args: Sequence[RedisArg]) -> bytes:
    """``EVALSHA sha len(keys) *keys *args`` in RESP, as :func:`hiredis.pack_command` has it.

    :class:`PackedKeys` are copied in as stored (the names are not encoded again).
    """
    if type(keys) is not PackedKeys or not args:
        return _pack(("EVALSHA", sha, len(keys), *keys, *args))
    head = _SHA_HEADS.get((sha, len(keys)))
    if head is None:
        if len(_SHA_HEADS) >= 64:
            _SHA_HEADS.clear()  # a handful of scripts and key counts; a bound, not an LRU
        head = _SHA_HEADS[(sha, len(keys))] = _bulks(_pack(("EVALSHA", sha, len(keys))))
    count = b"*%d\r\n" % (3 + len(keys) + len(args))
    return b"".join((count, head, keys.packed, _bulks(_pack(tuple(args)))))


def _reply_error(error: hiredis.ReplyError) -> ResponseError:
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Wire(asyncio.Protocol):
    """One connection: queued writes flushed once per loop iteration, replies in order.

    Each command carries a deadline. One timer (not one per command) fails
    the commands past theirs with :class:`TimeoutError` (their replies, when
    they come, are dropped) and drops the connection when Redis has been
    silent for the whole timeout while owing replies.
    """

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress = 0.0  # loop time of the last reply (or of the first owed one)
        self.lost: BaseException | None = None

    # asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._progress = self._loop.time()
        waiters = self._waiters
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._abort(RedisConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiters:  # an answer nobody asked for: the stream cannot be trusted
                self._abort(RedisConnectionError("redis sent an unexpected reply"))
                return
            waiter = waiters.popleft()[0]
            if waiter.done():  # its caller gave up (deadline, cancellation)
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(_reply_error(reply))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(
                f"redis connection lost: {type(exc).__name__}" if exc else "redis connection closed"
            )
        self._fail_all(self.lost)

    # sending -------------------------------------------------------------------------

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply, or fails at ``deadline``."""
        if self.lost is not None:
            raise RedisConnectionError(str(self.lost))
        waiter = self._loop.create_future()
        if not self._waiters:
            self._progress = self._loop.time()
        self._waiters.append((waiter, deadline))
        self._out.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._watch)
        return waiter

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and self.lost is None and out:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _watch(self) -> None:
        """Fail overdue commands; drop the connection if Redis went silent while owing."""
        self._watchdog = None
        if self.lost is not None:
            return
        now = self._loop.time()
        next_check = self._progress + self._timeout
        if self._waiters and now >= next_check:
            self._abort(RedisConnectionError("redis did not answer in time"))
            return
        for waiter, deadline in self._waiters:
            if waiter.done():
                continue
            if deadline <= now:
                waiter.set_exception(TimeoutError("redis did not answer in time"))
            else:
                next_check = min(next_check, deadline)
        if self._waiters:
            self._watchdog = self._loop.call_at(next_check, self._watch)

    # ending --------------------------------------------------------------------------

    def _abort(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and fails the waiters
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiters:
            waiter = self._waiters.popleft()[0]
            if not waiter.done():
                # a fresh instance each: one raised in many tasks would pile up tracebacks
                waiter.set_exception(RedisConnectionError(str(error)))

    def close(self) -> None:
        """Close the connection; waiting callers fail."""
        self._abort(RedisConnectionError("redis client closed"))


class PipelinedRedis:
    """Commands from every caller of one process, pipelined over one connection.

    ``host``/``port`` (or a Unix socket ``path``), optional ``username`` /
    ``password`` (``AUTH``) and ``db`` (``SELECT``); ``tls``, an SSL context
    for a ``rediss://`` server (its name is checked against ``host``). ``timeout_seconds``
    bounds connecting and how long Redis may stay silent while it owes
    replies. Use :meth:`for_client` to talk to the server a redis-py client
    is configured for.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_seconds: float = 1.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout must be positive")
        self._host = host
        self._port = port
        self._path = path
        self._db = db
        self._username = username
        self._password = password
        self._timeout = timeout_seconds
        self._tls = tls
        self._wire: _Wire | None = None
        self._connecting: asyncio.Task[_Wire] | None = None
        self._closed = False

    @classmethod
    def for_client(cls, client: RedisClient, timeout_seconds: float) -> PipelinedRedis | None:
        """The same server as redis-py ``client`` (TCP, TLS or Unix socket), else ``None``.

        A Cluster, Sentinel, credential providers and other set-ups this
        client does not speak return ``None``: the caller keeps using redis-py
        (which follows slot maps and failovers).
        """
        pool = getattr(client, "connection_pool", None)
        if pool is None:  # a RedisCluster: one pool per node
            return None
        kwargs = pool.connection_kwargs
        if kwargs.get("credential_provider") is not None:
            return None
        common: dict[str, Any] = {
            "db": int(kwargs.get("db") or 0),
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "timeout_seconds": timeout_seconds,
        }
        if pool.connection_class is Connection:
            return cls(
                host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), **common
            )
        if pool.connection_class is SSLConnection:
            # the context redis-py would build from the same settings (CA file, checks)
            context = SSLConnection(**kwargs).ssl_context.get()
            host = kwargs.get("host", "localhost")
            return cls(host=host, port=int(kwargs.get("port", 6379)), tls=context, **common)
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=kwargs["path"], **common)
        return None

    @property
    def tls(self) -> bool:
        """Whether the connection is TLS (``rediss://``)."""
        return self._tls is not None

    async def execute(self, *args: RedisArg) -> Any:
        """Send one command and return its reply (bytes, int, list...; errors raise).

        Bounded by the timeout, connecting included: past it, :class:`TimeoutError`.
        """
        return await self._send(_pack(args))

    async def _send(self, packed: bytes) -> Any:
        """One packed command's reply, within the timeout (connecting included)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        wire = self._wire
        if wire is None or wire.lost is not None:
            wire = await self._connect()
        return await wire.send(packed, deadline)

    async def evalsha(
        self, sha: str, script: str, keys: Sequence[RedisArg], args: Sequence[RedisArg]
    ) -> Any:
        """``EVALSHA``; when Redis lacks the script (restart, flush), ``EVAL`` loads it."""
        try:
            return await self._send(pack_evalsha(sha, keys, args))
        except NoScriptError:
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """Close the connection (idempotent); later commands fail."""
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    # connecting ----------------------------------------------------------------------

    async def _connect(self) -> _Wire:
        if self._closed:
            raise RedisConnectionError("redis client closed")
        task = self._connecting
        if task is None:
            # one attempt shared by every caller that finds no connection
            task = asyncio.get_running_loop().create_task(self._open())
            self._connecting = task
            task.add_done_callback(self._connected)
        # shielded: one caller giving up must not cancel the others' connection attempt
        return await asyncio.shield(task)

    def _connected(self, task: asyncio.Task[_Wire]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._wire = task.result()

    async def _open(self) -> _Wire:
        loop = asyncio.get_running_loop()
        wire = _Wire(self._timeout)
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: wire, self._path)
                else:
                    await loop.create_connection(
                        lambda: wire,
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
                deadline = loop.time() + self._timeout
                if self._password is not None:
                    credentials = (
                        (self._username, self._password) if self._username else (self._password,)
                    )
                    await wire.send(_pack(("AUTH", *credentials)), deadline)
                if self._db:
                    await wire.send(_pack(("SELECT", self._db)), deadline)
        except TimeoutError:
            wire.close()
            raise RedisConnectionError("redis did not accept a connection in time") from None
        except OSError as exc:
            wire.close()
            raise RedisConnectionError(f"redis unreachable: {type(exc).__name__}: {exc}") from None
        except BaseException:
            wire.close()
            raise
        return wire
