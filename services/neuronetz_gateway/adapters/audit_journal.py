"""The audit writer's write-ahead journal: a killed process loses no submitted row.

The writer keeps rows in memory for up to a flush interval before they reach
Postgres (or the spool). So that a SIGKILL at that moment loses none, every
submitted row is first appended to this process's journal: one ``os.write``
of ``<tag><json>\\n`` (tag ``a`` audit, ``p`` prompt) to a segment file
``journal-<time_ns>-<hex>.wal`` in the writer's spool directory. No fsync:
the page cache survives a process kill, not a machine crash (the last rows
not yet in Postgres or the spool can still be lost then).

Each segment is held with an exclusive ``flock`` for as long as it lives
(created under a ``.wal.new`` name, locked, then renamed, so no one sees it
unlocked). The writer rotates the current segment at each batch it takes and
counts per segment the rows not yet written (Postgres, spool or set aside);
a segment that is not current and has none left is unlinked. A clean stop
removes the journal after the final flush.

A ``.wal`` file whose lock can be taken belongs to a process that is gone
(the kernel drops an ``flock`` with its last descriptor, SIGKILL included):
an *orphan*, which :func:`claim_orphans` hands to the writer's replay. A
file whose lock is refused belongs to a live process (another ``--workers``
process, a replica on the same volume) and is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from neuronetz_gateway.domain.accounting import AuditRow, PromptRow
from neuronetz_gateway.logging import get_logger

__all__ = [
    "FILE_MODE",
    "Journal",
    "JournalContents",
    "OrphanJournal",
    "Segment",
    "claim_orphans",
    "decode",
    "encode_row",
    "unlink_segments",
]

log = get_logger(__name__)

JOURNAL_GLOB = "journal-*.wal"
_NEW_SUFFIX = ".new"
#: A ``.wal.new`` left by a process killed while creating a segment: removed after this.
_LEFTOVER_AGE_SECONDS = 60.0
#: Journals (and spool files) hold opted-in prompt text: their owner's alone.
FILE_MODE = 0o600

_encoder = msgspec.json.Encoder()
_TAGS: dict[type, bytes] = {AuditRow: b"a", PromptRow: b"p"}
_AUDIT, _PROMPT = ord("a"), ord("p")
_audit_decoder = msgspec.json.Decoder(AuditRow)
_prompt_decoder = msgspec.json.Decoder(PromptRow)


def encode_row(row: AuditRow | PromptRow) -> bytes:
    """A row as JSON; text JSON cannot carry (lone surrogates, from client input) replaced.

    Replaced as :func:`~neuronetz_gateway.adapters.audit_writer.clean_text`
    does before Postgres: the row written is the same either way.
    """
    try:
        return _encoder.encode(row)
    except UnicodeEncodeError:
        fields = {
            name: value.encode("utf-8", "replace").decode("utf-8")
            for name in row.__struct_fields__
            if isinstance(value := getattr(row, name), str)
        }
        return _encoder.encode(msgspec.structs.replace(row, **fields))


@dataclass(eq=False)
class Segment:
    """One journal file of this process: its rows not yet written, and its locked fd."""

    path: Path
    fd: int
    outstanding: int = 0
    appended: int = 0


class Journal:
    """This process's journal: append on submit, release when written, rotate per batch."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._current: Segment | None = None
        self._segments: list[Segment] = []  # all of ours not yet unlinked, oldest first
        self._failing = False

    @property
    def names(self) -> set[str]:
        """File names of this process's segments (a scan skips them)."""
        return {s.path.name for s in self._segments}

    # -- hot path -----------------------------------------------------------------

    def append(self, row: AuditRow | PromptRow) -> Segment | None:
        """Journal ``row``; the segment holding it, or ``None`` when it could not be."""
        segment = self._current
        if segment is None:
            return None
        try:
            data = _TAGS[type(row)] + encode_row(row) + b"\n"
            written = os.write(segment.fd, data)
        except OSError as exc:
            self._broken(exc)
            return None
        except (TypeError, ValueError, msgspec.EncodeError) as exc:  # never the request's failure
            log.warning("audit_journal_unencodable", reason=type(exc).__name__)
            return None
        if written != len(data):  # disk full part-way: a torn last line, the segment ends
            self._broken(OSError(errno.ENOSPC, "short write"))
            return None
        segment.outstanding += 1
        segment.appended += 1
        if self._failing:
            log.info("audit_journal_writable_again")
            self._failing = False
        return segment

    def release(self, segment: Segment) -> Segment | None:
        """One of ``segment``'s rows is written; the segment if it may be unlinked now."""
        segment.outstanding -= 1
        if segment.outstanding <= 0 and segment is not self._current:
            self._segments.remove(segment)
            return segment
        return None

    # -- off the hot path (files created and removed in a thread) ---------------------

    def open(self) -> None:
        """Start the first segment (a failure is logged; the writer serves on without)."""
        self._switch(self._create())

    async def rotate(self) -> list[Segment]:
        """A new current segment (when the current one has rows); segments to unlink."""
        current = self._current
        if current is not None and current.appended == 0:
            return []
        fresh = await asyncio.to_thread(self._create)
        return self._switch(fresh)

    def _switch(self, fresh: Segment | None) -> list[Segment]:
        if fresh is not None:
            self._segments.append(fresh)
            self._current = fresh
        # the old current one if written already, and any a failed write ended empty
        done = [s for s in self._segments if s.outstanding <= 0 and s is not self._current]
        if done:
            self._segments = [s for s in self._segments if s not in done]
        return done

    def _create(self) -> Segment | None:
        name = f"journal-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.wal"
        path = self._dir / name
        staging = path.with_name(name + _NEW_SUFFIX)
        fd = -1
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            fd = os.open(staging, flags, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, path)  # visible only once locked
        except OSError as exc:
            if fd >= 0:
                with _quiet():
                    os.unlink(staging)
                os.close(fd)
            self._unwritable(exc)
            return None
        return Segment(path, fd)

    def _broken(self, exc: OSError) -> None:
        """The current segment cannot take more: no journal until the next rotation."""
        self._current = None
        self._unwritable(exc)

    def _unwritable(self, exc: OSError) -> None:
        if not self._failing:  # once per streak; never the row
            log.warning(
                "audit_journal_unwritable",
                reason=type(exc).__name__,
                errno=errno.errorcode.get(exc.errno or 0, exc.errno),
            )
            self._failing = True

    def close(self) -> list[Segment]:
        """Stop journaling; every segment with no unwritten row is returned for unlinking.

        The others (rows the writer could not keep anywhere) are closed and so
        unlocked: the next writer on this directory replays them as orphans.
        """
        self._current = None
        done = [s for s in self._segments if s.outstanding <= 0]
        for segment in self._segments:
            if segment.outstanding > 0:
                os.close(segment.fd)
        self._segments = []
        return done


def unlink_segments(segments: list[Segment]) -> None:
    """Remove written segments (the name first, then the lock: never visible unlocked).

    A name that cannot be removed (a read-only remount, permissions) is logged
    and its lock dropped all the same: its rows are written, so a later
    replay of it is harmless, and the writer's loop must go on.
    """
    for segment in segments:
        try:
            _remove(segment.path)
        finally:
            os.close(segment.fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning(
            "audit_journal_unremovable",
            file=path.name,
            errno=errno.errorcode.get(exc.errno or 0, exc.errno),
        )


# -- orphans (replay) ---------------------------------------------------------------


@dataclass(eq=False)
class OrphanJournal:
    """A dead process's journal, locked by us while we replay it."""

    path: Path
    fd: int

    def read(self) -> bytes:
        with open(self.fd, "rb", closefd=False) as f:  # our locked descriptor
            f.seek(0)
            return f.read()

    def done(self) -> None:
        """Written: remove it (then drop the lock; a removal refused is only logged)."""
        try:
            _remove(self.path)
        finally:
            os.close(self.fd)

    def keep(self) -> None:
        """Not written now (Postgres away): drop the lock, leave the file for later."""
        os.close(self.fd)


def claim_orphans(directory: Path, own: set[str]) -> list[OrphanJournal]:
    """Lock every journal in ``directory`` whose owner is gone (blocking: run in a thread).

    Journals of live processes (lock refused) and ``own`` names are left
    alone. Leftover ``.wal.new`` files of a process killed while creating a
    segment are removed once old enough.
    """
    claimed = []
    for path in sorted(directory.glob(JOURNAL_GLOB)):
        if path.name in own:
            continue
        orphan = _lock(path)
        if orphan is not None:
            claimed.append(orphan)
    for path in directory.glob(JOURNAL_GLOB + _NEW_SUFFIX):
        _remove_leftover(path)
    return claimed


def _lock(path: Path) -> OrphanJournal | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # gone (another process replayed it) or unreadable now
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the file we locked is still the one under that name (not replayed and removed
        # by another process between our open and our lock)
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:  # locked by its live owner (or gone)
        same = False
    if not same:
        os.close(fd)
        return None
    return OrphanJournal(path, fd)


def _remove_leftover(path: Path) -> None:
    try:
        if time.time() - path.stat().st_mtime < _LEFTOVER_AGE_SECONDS:
            return
    except OSError:
        return
    orphan = _lock(path)
    if orphan is not None:
        orphan.done()


@dataclass
class JournalContents:
    """A journal's rows by kind, and what could not be read back."""

    audits: list[AuditRow] = field(default_factory=list)
    prompts: list[PromptRow] = field(default_factory=list)
    torn_tail: bool = False  # a last line without its newline (the write the kill cut)
    unreadable: list[bytes] = field(default_factory=list)  # whole lines that do not decode


def decode(data: bytes) -> JournalContents:
    """The rows of a journal file's bytes; never raises on damage."""
    contents = JournalContents()
    lines = data.split(b"\n")
    if lines[-1]:
        contents.torn_tail = True
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            if line[0] == _AUDIT:
                contents.audits.append(_audit_decoder.decode(line[1:]))
            elif line[0] == _PROMPT:
                contents.prompts.append(_prompt_decoder.decode(line[1:]))
            else:
                contents.unreadable.append(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            contents.unreadable.append(line)
    return contents


def _quiet() -> contextlib.suppress:
    """Ignore a file already gone (another process or a retry removed it)."""
    return contextlib.suppress(FileNotFoundError)
