"""The audit writer's write-ahead journal: segments, orphans, damage, and the census count."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from neuronetz_gateway.adapters.audit_journal import (
    Journal,
    claim_orphans,
    decode,
    unlink_segments,
)
from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.domain.accounting import AuditRow, PromptRow


def _row(request_id: str, model: str = "llama3.2") -> AuditRow:
    return AuditRow(
        request_id=request_id,
        ts=datetime.now(UTC),
        tenant_id=1,
        key_id=2,
        key_prefix="nz_abc12345",
        route="chat",
        model=model,
        status=200,
        prompt_tokens=1,
        completion_tokens=1,
        ttfb_ms=1,
        duration_ms=1,
        streamed=False,
        client_disconnected=False,
        estimated=False,
    )


def _prompt(request_id: str) -> PromptRow:
    now = datetime.now(UTC)
    return PromptRow(
        request_id=request_id,
        tenant_id=1,
        key_id=2,
        created_at=now,
        expires_at=now,
        request_text="q",
        response_text="a",
    )


def _line(row: AuditRow | PromptRow) -> bytes:
    return (b"a" if isinstance(row, AuditRow) else b"p") + msgspec.json.encode(row) + b"\n"


def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("journal-*.wal"))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _RecordingConnection:
    def __init__(self, rows: list[object]) -> None:
        self._rows = rows

    async def executemany(self, statement: str, args: list[tuple[object, ...]]) -> None:
        self._rows.extend(a[0] for a in args)


class _RecordingPool:
    """Takes every write (what each row's request_id was)."""

    def __init__(self) -> None:
        self.request_ids: list[object] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_RecordingConnection]:
        yield _RecordingConnection(self.request_ids)


class _AwayPool:
    """Postgres away: every acquire fails as a refused connection does."""

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        raise ConnectionRefusedError
        yield None  # pragma: no cover


def _pool(pool: object) -> asyncpg.Pool:
    return cast("asyncpg.Pool", pool)


async def _next_progress(writer: AuditWriter) -> None:
    writer.progress.clear()
    async with asyncio.timeout(10):
        await writer.progress.wait()


# -- segments ---------------------------------------------------------------------------


async def test_a_segment_goes_once_rotated_and_every_row_written(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    first = [journal.append(_row(f"req-{n}")) for n in range(2)]
    assert len(_journals(tmp_path)) == 1
    assert first[0] is not None
    assert first[0] is first[1]
    assert await journal.rotate() == []  # rows not yet written: the old segment stays
    assert len(_journals(tmp_path)) == 2
    assert journal.append(_row("req-next")) is not first[0]
    assert journal.release(first[0]) is None  # one of its two rows still unwritten
    done = journal.release(first[0])
    assert done is first[0]
    unlink_segments([done])
    (current,) = _journals(tmp_path)  # the current one only
    # closed with a row unwritten: the segment stays, unlocked, for the next writer
    assert journal.close() == []
    assert [c.path for c in claim_orphans(tmp_path, set())] == [current]


async def test_an_empty_current_segment_is_not_rotated(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    names = journal.names
    assert await journal.rotate() == []
    assert journal.names == names
    unlink_segments(journal.close())
    assert _journals(tmp_path) == []


async def test_the_writer_keeps_one_segment_and_removes_it_on_a_clean_stop(
    tmp_path: Path,
) -> None:
    pool = _RecordingPool()
    writer = AuditWriter(_pool(pool), tmp_path, batch_size=5, flush_interval=60)
    await writer.start()
    for n in range(3):
        writer.submit(_row(f"req-{n}"))
    (journal,) = _journals(tmp_path)
    assert journal.read_bytes().count(b"\n") == 3  # on disk before any batch
    for n in range(3, 5):
        writer.submit(_row(f"req-{n}"))  # a full batch: written without the interval
    await _next_progress(writer)
    assert pool.request_ids == [f"req-{n}" for n in range(5)]
    (current,) = _journals(tmp_path)  # the written segment is gone, a fresh one is current
    assert current != journal
    assert current.read_bytes() == b""
    writer.submit(_row("req-5"))
    await writer.stop()
    assert pool.request_ids[-1] == "req-5"
    assert _names(tmp_path) == []


# -- orphans and live journals ------------------------------------------------------------


def test_a_torn_last_line_is_skipped_and_damage_never_raises() -> None:
    good: list[AuditRow | PromptRow] = [_row("req-1"), _prompt("req-1"), _row("req-2")]
    data = b"".join(_line(r) for r in good)
    contents = decode(data + b"x{not json}\n" + b"\n" + _line(_row("req-3"))[:-9])
    assert [r.request_id for r in contents.audits] == ["req-1", "req-2"]
    assert [r.request_id for r in contents.prompts] == ["req-1"]
    assert contents.torn_tail
    assert contents.unreadable == [b"x{not json}"]
    assert not decode(data).torn_tail
    assert decode(b"").audits == []


def test_a_live_journal_is_never_claimed(tmp_path: Path) -> None:
    """A journal whose owner holds its lock (another worker or replica) is left alone."""
    live = Journal(tmp_path)
    live.open()
    live.append(_row("req-live"))
    (path,) = _journals(tmp_path)
    before = path.read_bytes()
    assert claim_orphans(tmp_path, set()) == []
    assert path.read_bytes() == before
    unlink_segments(live.close())


def test_a_dead_process_journal_is_claimed_once(tmp_path: Path) -> None:
    orphan = tmp_path / "journal-00000000000000000001-aaaaaaaa.wal"
    orphan.write_bytes(_line(_row("req-dead")))
    (claimed,) = claim_orphans(tmp_path, set())
    assert claim_orphans(tmp_path, set()) == []  # locked by the first claim
    assert decode(claimed.read()).audits[0].request_id == "req-dead"
    claimed.done()
    assert list(tmp_path.iterdir()) == []


async def test_pending_since_counts_an_orphan_but_not_a_live_journal(tmp_path: Path) -> None:
    live = Journal(tmp_path)  # another worker on this directory, holding a row
    live.open()
    live.append(_row("req-other-worker"))
    writer = AuditWriter(_pool(_AwayPool()), tmp_path, retry_interval=0.05)
    await writer.start()
    assert writer.pending_since() is None  # the other worker reports its own rows
    orphan = tmp_path / "journal-00000000000000000001-bbbbbbbb.wal"
    data = _line(_row("req-dead"))
    orphan.write_bytes(data)
    assert await writer.replay_spool() == 0  # Postgres away: kept for later, and counted
    assert writer.pending_since() == 0.0
    assert writer.files_on_disk == 1  # nz_proxy_audit_spool_files: the live journal is not
    assert orphan.read_bytes() == data
    await writer.stop()
    restarted = AuditWriter(_pool(_AwayPool()), tmp_path)
    await restarted.start()  # counted from the start, before any replay
    assert restarted.pending_since() == 0.0
    await restarted.stop()
    assert orphan.exists()
    unlink_segments(live.close())


async def test_an_orphan_is_written_and_removed_when_postgres_takes_it(tmp_path: Path) -> None:
    orphan = tmp_path / "journal-00000000000000000001-cccccccc.wal"
    orphan.write_bytes(_line(_row("req-a")) + _line(_row("req-b")) + b'a{"request_')
    pool = _RecordingPool()
    writer = AuditWriter(_pool(pool), tmp_path)
    with capture_logs() as logs:
        assert await writer.replay_spool() == 1
    assert pool.request_ids == ["req-a", "req-b"]
    assert not orphan.exists()
    assert writer.pending_since() is None
    assert any(e["event"] == "audit_journal_torn_line_skipped" for e in logs)


# -- a journal that cannot be written -----------------------------------------------------


async def test_a_full_disk_costs_the_journal_not_the_row(tmp_path: Path) -> None:
    pool = _RecordingPool()
    writer = AuditWriter(_pool(pool), tmp_path, batch_size=2, flush_interval=60)
    await writer.start()
    (path,) = _journals(tmp_path)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        journal = writer._journal
        assert journal is not None
        os.dup2(full, journal._segments[0].fd)  # every write now fails with ENOSPC
        with capture_logs() as logs:
            writer.submit(_row("req-secret-1", model="m"))
            writer.submit(_row("req-secret-2", model="m"))
        await _next_progress(writer)
    finally:
        os.close(full)
    assert pool.request_ids == ["req-secret-1", "req-secret-2"]
    warnings = [e for e in logs if e["event"] == "audit_journal_unwritable"]
    assert len(warnings) == 1
    assert warnings[0]["errno"] == "ENOSPC"
    assert "req-secret" not in repr(logs)
    writer.submit(_row("req-after"))  # a fresh segment took over at the batch
    assert b"req-after" in max(_journals(tmp_path)).read_bytes()
    await writer.stop()
    assert _names(tmp_path) == []
    assert not path.exists()


async def test_rows_the_spool_cannot_take_stay_in_the_journal_for_the_next_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres away and the spool failing too: the batch loop lives, the rows wait on disk."""
    writer = AuditWriter(_pool(_AwayPool()), tmp_path, batch_size=2, flush_interval=60)

    def spool_refused(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_spool_file", spool_refused)
    await writer.start()
    writer.submit(_row("req-1"))
    writer.submit(_row("req-2"))
    await _next_progress(writer)
    assert writer.pending_since() == 0.0  # in no spool, not in Postgres: a rebuild waits
    writer.submit(_row("req-3"))
    writer.submit(_row("req-4"))
    await _next_progress(writer)  # the batch loop still runs
    await writer.stop()
    assert len(_journals(tmp_path)) == 2  # one segment per batch, both kept
    pool = _RecordingPool()
    assert await AuditWriter(_pool(pool), tmp_path).replay_spool() == 2
    assert sorted(map(str, pool.request_ids)) == ["req-1", "req-2", "req-3", "req-4"]
    assert _names(tmp_path) == []


# -- who may read the files -------------------------------------------------------------


async def test_journal_and_spool_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """They hold opted-in prompt text (every row is journaled): no other local user reads it."""
    old = os.umask(0o022)  # the usual umask: files 0644 unless the writer says otherwise
    try:
        writer = AuditWriter(
            _pool(_AwayPool()), tmp_path, batch_size=2, flush_interval=60, namespace="deploy"
        )
        await writer.start()
        writer.submit(_row("req-1"))
        writer.submit(_prompt("req-1"))
        await _next_progress(writer)  # Postgres away: both spooled, a new segment current
        writer.submit(_row("req-2"))
        folder = tmp_path / "deploy"
        files = list(folder.iterdir())
        assert {p.suffix for p in files} == {".wal", ".jsonl"}
        modes = {p.name: p.stat().st_mode & 0o777 for p in files}
        assert all(mode & 0o077 == 0 for mode in modes.values()), modes
        assert folder.stat().st_mode & 0o077 == 0
        await writer.stop()
    finally:
        os.umask(old)


# -- a journal file that cannot be removed ------------------------------------------------


async def test_a_segment_that_cannot_be_removed_costs_no_later_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlink refused (a read-only remount, an operator's chmod) never ends the batch loop."""
    real_unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".wal":
            raise PermissionError(13, "Permission denied")
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    pool = _RecordingPool()
    writer = AuditWriter(_pool(pool), tmp_path, batch_size=2, flush_interval=60)
    await writer.start()
    with capture_logs() as logs:
        writer.submit(_row("req-1"))
        writer.submit(_row("req-2"))
        await _next_progress(writer)
        writer.submit(_row("req-3"))
        writer.submit(_row("req-4"))
        await _next_progress(writer)
    assert pool.request_ids == ["req-1", "req-2", "req-3", "req-4"]
    assert any(e["event"] == "audit_journal_unremovable" for e in logs)
    await writer.stop()
    # the written segments stay, unlocked: a later replay writes them again (harmless)
    monkeypatch.undo()
    assert len(claim_orphans(tmp_path, set())) == len(_journals(tmp_path)) >= 2


class _ReturningPool(_RecordingPool):
    """Postgres away until ``back`` is set, then it takes every write."""

    def __init__(self) -> None:
        super().__init__()
        self.back = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_RecordingConnection]:
        if not self.back:
            raise ConnectionRefusedError
        yield _RecordingConnection(self.request_ids)


async def test_rows_the_spool_could_not_take_are_written_by_the_same_writer_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during a Postgres outage: once Postgres is back, this writer writes the rows.

    Before, they waited in its journal for the next process, and its census entry said
    "rows on disk" until a restart: every budget rebuild (a key's first decision of
    each day, too) waited out the ledger timeout and failed closed, for good.
    """
    pool = _ReturningPool()
    writer = AuditWriter(
        _pool(pool), tmp_path, batch_size=2, flush_interval=60, retry_interval=0.05
    )

    def spool_refused(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_spool_file", spool_refused)
    await writer.start()
    writer.submit(_row("req-1"))
    writer.submit(_prompt("req-1"))
    await _next_progress(writer)
    assert writer.pending_since() == 0.0
    pool.back = True  # the disk is still full
    async with asyncio.timeout(10):  # tried again within a retry interval
        while True:
            writer.progress.clear()
            if writer.pending_since() is None:
                break
            await writer.progress.wait()
    assert pool.request_ids == ["req-1", "req-1"]  # the audit row and the prompt row
    assert len(_journals(tmp_path)) == 1  # their segment is gone: only the current one
    await writer.stop()
    assert _names(tmp_path) == []


async def test_rows_still_unkept_after_a_retry_keep_their_journal_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries that fail too (Postgres still away, the disk still full) release nothing.

    Their segment is the rows' only copy on disk: released at a failed retry it was
    unlinked (a SIGKILL then lost them), and the retry that finally wrote them
    released it a second time.
    """
    pool = _ReturningPool()
    writer = AuditWriter(
        _pool(pool), tmp_path, batch_size=2, flush_interval=60, retry_interval=0.02
    )

    def spool_refused(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_spool_file", spool_refused)
    await writer.start()
    writer.submit(_row("req-1"))
    writer.submit(_prompt("req-1"))
    await _next_progress(writer)
    for _ in range(3):  # three failed retries
        await _next_progress(writer)
    assert writer.pending_since() == 0.0
    held = [j for j in _journals(tmp_path) if b"req-1" in j.read_bytes()]
    assert len(held) == 1  # the rows' segment is still on disk
    pool.back = True
    async with asyncio.timeout(10):
        while True:
            writer.progress.clear()
            if writer.pending_since() is None:
                break
            await writer.progress.wait()
    assert pool.request_ids == ["req-1", "req-1"]
    assert not held[0].exists()  # released once, when written
    await writer.stop()
    assert _names(tmp_path) == []


async def test_a_spool_file_that_cannot_be_removed_once_does_not_end_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed spool file whose unlink is refused once: the replay loop tries again.

    Before, the exception ended the replay task: no spool file or dead process's
    journal was written again, and the census said "rows on disk" until a restart.
    """
    pool = _RecordingPool()
    (tmp_path / "00000000000000000001-abcdef01-audit.jsonl").write_bytes(
        msgspec.json.encode(_row("req-spooled")) + b"\n"
    )
    real_unlink = Path.unlink
    refusals = []

    def refused_once(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".jsonl" and not refusals:
            refusals.append(self.name)
            raise PermissionError(13, "Permission denied")
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused_once)
    writer = AuditWriter(_pool(pool), tmp_path, retry_interval=0.05)
    with capture_logs() as logs:
        await writer.start()
        async with asyncio.timeout(10):
            while True:
                writer.progress.clear()
                if writer.spooled_files == 0:
                    break
                await writer.progress.wait()
    await writer.stop()
    assert refusals
    assert _names(tmp_path) == []
    assert pool.request_ids[-1] == "req-spooled"  # written again: harmless
    assert writer.pending_since() is None
    assert any(e["event"] == "audit_replay_failed" for e in logs)
