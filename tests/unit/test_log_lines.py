"""The hot path's log line: written directly in the JSON setup, the same line structlog writes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

from neuronetz_gateway import logging as nz_logging
from neuronetz_gateway.domain.accounting import AuditRow

FIELDS = {"request_id": "abc", "route": "chat", "status": 200, "latency_ms": 0.25}


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    structlog.reset_defaults()
    monkeypatch.setattr(nz_logging._Direct, "writer", None)


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stderr.log").open("a") as file:
        yield file


def _stderr_file(file: TextIO, monkeypatch: pytest.MonkeyPatch) -> TextIO:
    """A real file (with a descriptor) as stderr, appended to by both writers.

    Set inside the test: pytest's capture sets ``sys.stderr`` anew in every phase.
    """
    monkeypatch.setattr(sys, "stderr", file)
    return file


def _lines(file: TextIO) -> list[dict[str, object]]:
    file.flush()
    text = Path(file.name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_json_setup_writes_the_line_itself_with_structlogs_keys(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _stderr_file(log_file, monkeypatch)
    nz_logging.configure_logging("info", "json")
    assert nz_logging._Direct.writer is not None  # the direct writer is in force
    log = nz_logging.get_logger("test")
    nz_logging.info_line(log, "authorize", FIELDS)
    log.info("authorize", **FIELDS)  # the same event through structlog's chain
    direct, chained = _lines(file)
    assert list(direct) == list(chained)  # same keys, same order
    for key in (*FIELDS, "event", "level"):
        assert direct[key] == chained[key]
    stamp = str(direct["timestamp"])
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-02T16:19:08.123456Z")
    assert stamp[:16] == str(chained["timestamp"])[:16]


@pytest.mark.usefixtures("restore_logging")
def test_level_above_info_writes_nothing(log_file: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    file = _stderr_file(log_file, monkeypatch)
    nz_logging.configure_logging("warning", "json")
    nz_logging.info_line(nz_logging.get_logger("test"), "authorize", FIELDS)
    assert _lines(file) == []


@pytest.mark.usefixtures("restore_logging")
def test_a_reconfigured_structlog_gets_the_event(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _stderr_file(log_file, monkeypatch)
    nz_logging.configure_logging("info", "json")
    with capture_logs() as logs:
        nz_logging.info_line(structlog.get_logger("fresh"), "authorize", FIELDS)
    assert logs == [{**FIELDS, "event": "authorize", "log_level": "info"}]
    assert _lines(file) == []


@pytest.mark.usefixtures("restore_logging")
def test_console_format_goes_through_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    nz_logging.configure_logging("info", "console")
    assert nz_logging._Direct.writer is None
    nz_logging.info_line(nz_logging.get_logger("test"), "authorize", FIELDS)
    assert "authorize" in out.getvalue() and "request_id" in out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_lines_of_one_loop_iteration_leave_in_one_write(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _stderr_file(log_file, monkeypatch)
    nz_logging.configure_logging("info", "json")
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(nz_logging.os, "write", counting_write)
    log = nz_logging.get_logger("test")

    async def decisions() -> int:
        for i in range(3):
            nz_logging.info_line(log, "authorize", {**FIELDS, "request_id": str(i)})
        pending = len(writes)
        await asyncio.sleep(0)  # the loop's next iteration
        return pending

    assert asyncio.run(decisions()) == 0
    assert len(writes) == 1
    assert [line["request_id"] for line in _lines(file)] == ["0", "1", "2"]


@pytest.mark.usefixtures("restore_logging")
def test_the_proxy_request_line_is_the_same_line_written_directly(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's line (an audit row's fields: a datetime, None values) as structlog wrote it."""
    file = _stderr_file(log_file, monkeypatch)
    nz_logging.configure_logging("info", "json")
    row = AuditRow(
        request_id="r1", ts=datetime(2026, 12, 3, 18, 0, 1, 123456, tzinfo=UTC), tenant_id=1,
        key_id=2, key_prefix="nz_abc", route="chat", model=None, status=200, prompt_tokens=3,
        completion_tokens=20, ttfb_ms=None, duration_ms=7, streamed=True,
        client_disconnected=False, estimated=False,
    )  # fmt: skip
    fields = {**msgspec.structs.asdict(row), "tenant": "acme", "upstream_error": None}
    log = nz_logging.get_logger("test")
    nz_logging.info_line(log, "proxy_request", fields)
    log.info("proxy_request", **fields)
    direct, chained = _lines(file)
    assert list(direct) == list(chained)
    assert {k: v for k, v in direct.items() if k != "timestamp"} == {
        k: v for k, v in chained.items() if k != "timestamp"
    }
