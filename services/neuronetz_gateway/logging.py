"""One structlog setup, called first by every entry point.

JSON lines (msgspec-encoded) when not on a tty, a console renderer on one.
Per-request context is bound with contextvars by the services' middleware.

:func:`info_line` is the hot path's way to log (one line per ``/authorize``
decision): with JSON logs at info level or below it encodes the line itself
and writes it to stderr in one ``write``, the same keys structlog's chain
would write (the event's fields, ``event``, ``level``, ``timestamp``) at
about a sixth of the CPU, the lines of one event-loop iteration in one
``write``; otherwise (console format, a higher level, or a
test that reconfigured structlog, e.g. ``capture_logs``) it is plain
``log.info``. Nothing is bound in contextvars on that path, so none is merged.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec
import structlog

__all__ = ["configure_logging", "get_logger", "info_line"]

_json = msgspec.json.Encoder()
#: pending bytes that are written at once rather than at the loop's next iteration
_MAX_PENDING = 64 * 1024


def _serialize(event: Any, **_: Any) -> str:
    return _json.encode(event).decode()


class _JsonLines:
    """Writes events as JSON lines, bypassing structlog's processor chain.

    Inside a running event loop the lines of one loop iteration are written
    together, in one ``write`` scheduled with ``call_soon`` (at concurrency 32
    that is one system call for many decisions); outside one, at once. A
    line waits at most until the loop's next iteration (or exit), so a
    decision line can follow another module's line of the same instant.
    """

    __slots__ = ("_fd", "_file", "_pending", "_second", "_stamp", "renderer")

    def __init__(self, file: TextIO, renderer: object) -> None:
        self._file = file
        try:
            self._fd: int | None = file.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor
            self._fd = None
        #: the renderer of the chain this writer stands in for; when structlog's chain
        #: ends otherwise (``capture_logs`` edits the list in place), it steps aside
        self.renderer = renderer
        self._second = -1
        self._stamp = ""
        self._pending = bytearray()

    def _timestamp(self) -> str:
        """ISO 8601 UTC with microseconds, as structlog's ``TimeStamper(fmt="iso", utc=True)``."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"

    def write(self, event: str, level: str, fields: Mapping[str, object]) -> None:
        line = _json.encode(
            {**fields, "event": event, "level": level, "timestamp": self._timestamp()}
        )
        data = line + b"\n"
        if self._fd is None:
            self._file.write(data.decode())
            self._file.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing would flush a buffer
            self._write(data)
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending += data
        if len(self._pending) >= _MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write what is pending (the scheduled flush, at exit, or when the buffer is full)."""
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:  # (never: such a stream is written to directly)
            self._file.write(data.decode())
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


class _Direct:
    """The direct writer in force (None: every line goes through structlog)."""

    writer: _JsonLines | None = None


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once per process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_serialize)
        if use_json
        else structlog.dev.ConsoleRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if _Direct.writer is not None:
        _Direct.writer.flush()
    _Direct.writer = (
        _JsonLines(sys.stderr, renderer) if use_json and numeric <= logging.INFO else None
    )
    if _Direct.writer is not None:
        atexit.register(_Direct.writer.flush)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str) -> Any:
    """A bound structlog logger named after its module."""
    return structlog.get_logger(name)


def _chain_ends_in(renderer: object) -> bool:
    processors = structlog.get_config()["processors"]
    return bool(processors) and processors[-1] is renderer


def info_line(log: Any, event: str, fields: Mapping[str, object]) -> None:
    """``log.info(event, **fields)``, written directly when the JSON setup is in force."""
    fast = _Direct.writer
    if fast is not None and _chain_ends_in(fast.renderer):
        fast.write(event, "info", fields)
    else:
        log.info(event, **fields)
