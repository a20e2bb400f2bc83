"""The audit writer: usage and prompt rows to Postgres in batches, off the hot path.

Requests :meth:`AuditWriter.submit` rows: one ``os.write`` to this
process's write-ahead journal (:mod:`~neuronetz_gateway.adapters.audit_journal`,
no fsync) and a queue put. One
background task collects them into batches (``batch_size`` rows or
``flush_interval`` seconds) and writes each batch with one pipelined
``executemany`` (``ON CONFLICT (request_id) DO NOTHING``). When Postgres
cannot take a batch, the batch goes to the durable local spool: one JSONL
file per batch and kind, written to a temporary name, fsync'd and renamed
(so a file is either whole or absent). A replay task writes spooled files
back, oldest first, and deletes each once written; replaying twice is
harmless because ``request_id`` is unique in ``usage_log`` and in
``prompt_log``. On shutdown the queue is flushed (to
Postgres, or to the spool) and the journal removed.

A process killed before its rows left the queue leaves its journal: the
replay (at start and in the replay loop) writes the journal of any process
that is gone (its ``flock`` can be taken) with the same idempotent inserts
and removes it; a journal whose owner lives is never touched.

The spool directory is ``spool_dir/<namespace>`` when a namespace is given
(the proxy passes its database and Redis prefix,
:func:`~neuronetz_gateway.domain.ledger_census.spool_namespace`): replay
only ever sees the files of its own deployment. :meth:`pending_since` says
since when rows wait unwritten (queue, batch in flight, spool, the journals
of dead processes), which the
ledger census reports so that budgets are never rebuilt from a ledger that
lacks them; :attr:`progress` is set after every write and replay.

A row Postgres refuses for good (it should not happen: text is cleaned of
what Postgres cannot store, and lengths are cut to the columns) is isolated
by splitting its batch, so one bad row never costs the others their place
in the ledger; it is set aside in a ``.bad`` file for an operator. Several
processes may share one spool directory (``--workers``, replicas on one
volume): a file another one already replayed is simply gone, which is fine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from neuronetz_gateway.adapters.audit_journal import (
    FILE_MODE,
    Journal,
    OrphanJournal,
    Segment,
    claim_orphans,
    decode,
    encode_row,
    unlink_segments,
)
from neuronetz_gateway.domain.accounting import AuditRow, PromptRow
from neuronetz_gateway.logging import get_logger
from neuronetz_gateway.stopping import stop_task, wait_set

__all__ = ["AuditWriter", "clean_text"]

log = get_logger(__name__)

_INSERT_AUDIT = """
INSERT INTO usage_log (request_id, ts, tenant_id, key_id, key_prefix, route, model, status,
    prompt_tokens, completion_tokens, ttfb_ms, duration_ms, streamed, client_disconnected,
    estimated, revoked)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (request_id) DO NOTHING
"""
_INSERT_PROMPT = """
INSERT INTO prompt_log (request_id, tenant_id, key_id, created_at, expires_at, request_text,
    response_text)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (request_id) DO NOTHING
"""

_STOP = object()
#: How long a stop waits for the replay task (it ends by its flag if a cancel is lost).
_STOP_WITHIN_SECONDS = 5.0
_audit_decoder = msgspec.json.Decoder(AuditRow)
_prompt_decoder = msgspec.json.Decoder(PromptRow)
_KINDS: dict[str, Any] = {"audit": _audit_decoder, "prompt": _prompt_decoder}


# Column widths of usage_log (adapters/postgres/tables.py).
_REQUEST_ID_MAX, _KEY_PREFIX_MAX, _ROUTE_MAX, _MODEL_MAX = 64, 11, 64, 200


def clean_text(text: str) -> str:
    """Text Postgres can store: no NUL, no lone surrogates (both would refuse a whole batch)."""
    if "\x00" not in text and text.isascii():
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _column(text: str, width: int) -> str:
    return clean_text(text)[:width]


def _audit_args(row: AuditRow) -> tuple[Any, ...]:
    return (
        _column(row.request_id, _REQUEST_ID_MAX),
        row.ts,
        row.tenant_id,
        row.key_id,
        _column(row.key_prefix, _KEY_PREFIX_MAX),
        _column(row.route, _ROUTE_MAX),
        None if row.model is None else _column(row.model, _MODEL_MAX),
        row.status,
        row.prompt_tokens,
        row.completion_tokens,
        row.ttfb_ms,
        row.duration_ms,
        row.streamed,
        row.client_disconnected,
        row.estimated,
        row.revoked,
    )


def _prompt_args(row: PromptRow) -> tuple[Any, ...]:
    return (
        _column(row.request_id, _REQUEST_ID_MAX),
        row.tenant_id,
        row.key_id,
        row.created_at,
        row.expires_at,
        clean_text(row.request_text),
        clean_text(row.response_text),
    )


#: SQLSTATE classes that blame the row itself: data exception, integrity constraint.
_ROW_REFUSED_CLASSES = ("22", "23")


def _transient(exc: BaseException) -> bool:
    """Whether a write failure keeps the row for a retry (spool), not set aside for good.

    Only a refusal of the row's own data is for good: Postgres's data and
    integrity errors (SQLSTATE classes 22 and 23), or a value the client
    could not encode (asyncpg's client-side ``DataError`` is a ``ValueError``).
    Everything else (the connection or asyncpg's own state failing as Postgres
    stops, a timeout, a schema not yet migrated, an error nobody foresaw) is
    retried: set aside, the row would be missing from the ledger.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] not in _ROW_REFUSED_CLASSES
    return not isinstance(exc, ValueError | TypeError)


class AuditWriter:
    """Batches rows to Postgres; spools them durably while it is unreachable."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        spool_dir: str | Path,
        *,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        retry_interval: float = 1.0,
        write_timeout: float = 5.0,
        namespace: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self.spool_dir = Path(spool_dir) / namespace if namespace else Path(spool_dir)
        self._clock = clock
        # submission time and journal segment of the rows not yet written or spooled
        self._unwritten: collections.deque[tuple[float, Segment | None]] = collections.deque()
        self._journal: Journal | None = None
        self._stopped = False  # stop() ran (and no start() since): a row goes to the spool
        self.orphan_journals = 0  # journals of dead processes, not yet replayed
        # rows neither written nor spooled (the spool failed), with their journal segments:
        # tried again each retry interval, so that this writer's census entry says "rows
        # on disk" only until Postgres or the spool takes them (not until a restart)
        self._unkept: list[tuple[object, Segment | None]] = []
        self.progress = asyncio.Event()  # set after each write, spool or replay
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._write_timeout = write_timeout
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._replay_now = asyncio.Event()
        self._stopping = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self.spooled_files = 0

    # -- producer side (hot path) ---------------------------------------------

    def submit(self, row: AuditRow | PromptRow) -> None:
        """Journal a row and queue it for the next batch (never blocks, never fails).

        After :meth:`stop` (a request finishing late): straight to the spool instead.
        """
        journal = self._journal
        if journal is None and self._stopped:
            self._late(row)
            return
        segment = journal.append(row) if journal is not None else None
        self._unwritten.append((self._clock(), segment))
        self._queue.put_nowait(row)

    def _late(self, row: AuditRow | PromptRow) -> None:
        """A row after :meth:`stop` (no batch reads the queue, no journal): to the spool now.

        Written here and now (an fsync in the loop: shutdown only), replayed by the
        next writer on the directory; logged loudly, for it should not happen.
        """
        kind = "audit" if isinstance(row, AuditRow) else "prompt"
        try:
            self._write_spool_file(kind, encode_row(row) + b"\n")
        except OSError as exc:
            log.error(  # noqa: TRY400 - the reason is enough; no traceback in the log
                "audit_row_lost_after_stop", kind=kind, reason=type(exc).__name__
            )
            return
        self.spooled_files += 1
        log.error("audit_row_after_stop", kind=kind)

    def pending_since(self) -> float | None:
        """Unix time of the oldest row not yet in Postgres; ``0.0`` with rows on disk.

        On disk: spool files, journals of dead processes not yet replayed,
        rows the spool could not take. The journals of live processes (other
        workers or replicas on this directory) are theirs to report.
        ``None`` when every row submitted so far is written.
        """
        if self.spooled_files or self.orphan_journals or self._unkept:
            return 0.0
        return self._unwritten[0][0] if self._unwritten else None

    @contextlib.asynccontextmanager
    async def replay_held(self) -> AsyncIterator[None]:
        """No spool replay inside this block (operators and tests: a replay at a chosen time)."""
        async with self._spool_lock:
            yield

    @property
    def files_on_disk(self) -> int:
        """Files of rows waiting for Postgres: spooled batches and dead processes' journals."""
        return self.spooled_files + self.orphan_journals

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start the batch and replay tasks (replay begins with what a previous run left)."""
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        journal = Journal(self.spool_dir)
        journal.open()
        self._journal = journal
        self.spooled_files = len(self._spool_files())
        # counted before the first census report; replayed by the replay task
        orphans = claim_orphans(self.spool_dir, journal.names)
        self.orphan_journals = len(orphans)
        for orphan in orphans:
            orphan.keep()
        self._stopping.clear()
        self._stopped = False
        self._replay_now.set()
        self._tasks = [
            asyncio.create_task(self._batch_loop(), name="audit-batches"),
            asyncio.create_task(self._replay_loop(), name="audit-replay"),
        ]

    async def stop(self) -> None:
        """Flush the queue (to Postgres or the spool), stop the tasks, remove the journal.

        Journal segments still holding rows that were not kept anywhere stay
        on disk (unlocked): the next writer on the directory replays them.
        """
        if not self._tasks:
            return
        batch_task, replay_task = self._tasks
        self._tasks = []
        self._stopping.set()
        self._queue.put_nowait(_STOP)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await batch_task
            # the replay loop ends by the flag too (a cancellation swallowed mid-replay)
            self._replay_now.set()
            await stop_task(replay_task, within=_STOP_WITHIN_SECONDS)
        finally:
            self._stopped = True
            journal, self._journal = self._journal, None
            if journal is not None:
                unlink_segments(journal.close())

    # -- batching -----------------------------------------------------------------

    async def _batch_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch: list[object] = [first]
            if self._queue.qsize() < self._batch_size - 1 and not self._stopping.is_set():
                # gather a batch, but a shutdown does not wait for the interval
                await wait_set(self._stopping, self._flush_interval)
            while len(batch) < self._batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            await self._rotate()
            await self._written(batch, kept=await self._flush(batch))
        # Shutdown: whatever is still queued goes out too.
        rest = [item for item in self._drain() if item is not _STOP]
        if rest:
            await self._written(rest, kept=await self._flush(rest))

    async def _rotate(self) -> None:
        """A new journal segment for the rows after this batch (the old one goes once written)."""
        if self._journal is not None:
            done = await self._journal.rotate()
            if done:
                await asyncio.to_thread(unlink_segments, done)

    async def _written(self, batch: Sequence[object], *, kept: bool) -> None:
        """The ``batch`` (the oldest submitted) is in Postgres, the spool or set aside now.

        Not ``kept`` (the spool itself failed): they stay in their journal
        segments and are tried again (:meth:`_retry_unkept`); segments still
        holding them at a stop are kept for a replay after this process.
        """
        held = []
        for item in batch[: len(self._unwritten)]:
            _, segment = self._unwritten.popleft()
            held.append((item, segment))
        if kept:
            await self._release(held)
        else:
            self._unkept += held
        self.progress.set()

    async def _release(self, held: Sequence[tuple[object, Segment | None]]) -> None:
        """Rows written: their journal segments lose them (and go once empty)."""
        journal, done = self._journal, []
        for _, segment in held:
            if segment is not None and journal is not None:
                finished = journal.release(segment)
                if finished is not None:
                    done.append(finished)
        if done:
            await asyncio.to_thread(unlink_segments, done)

    async def _retry_unkept(self) -> None:
        """Rows neither Postgres nor the spool took, tried again (oldest first)."""
        if not self._unkept:
            return
        held, self._unkept = self._unkept, []
        kept = False
        try:
            kept = await self._flush([item for item, _ in held])
        finally:
            if not kept:  # still nowhere (or cancelled): they wait on, in order
                self._unkept[:0] = held
        if kept:  # else their segments are still their only copy on disk
            await self._release(held)
        self.progress.set()

    def _drain(self) -> list[object]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _flush(self, batch: Sequence[object]) -> bool:
        """Write ``batch`` (or spool it); whether every row was kept somewhere."""
        audits = [r for r in batch if isinstance(r, AuditRow)]
        prompts = [r for r in batch if isinstance(r, PromptRow)]
        kept = True
        # Separately, so that a problem with one kind never holds the other back.
        for kind, rows in (("audit", audits), ("prompt", prompts)):
            if not rows:
                continue
            try:
                try:
                    rejected = await self._store(kind, rows)
                except Exception as exc:  # noqa: BLE001 - any failure to write: keep it on disk
                    log.warning(
                        "audit_spooled", kind=kind, rows=len(rows), reason=type(exc).__name__
                    )
                    await self._spool(kind, rows)
                    continue
                if rejected:
                    await self._set_aside(kind, rejected)
            except OSError as exc:  # the spool cannot take them: the journal still holds them
                log.error(  # noqa: TRY400 - the reason is enough; no traceback in the log
                    "audit_rows_unkept", kind=kind, rows=len(rows), reason=type(exc).__name__
                )
                kept = False
        if self.spooled_files:
            self._replay_now.set()
        return kept

    async def _store(
        self, kind: str, rows: Sequence[AuditRow] | Sequence[PromptRow]
    ) -> list[AuditRow | PromptRow]:
        """Write ``rows``; return those Postgres refuses for good (isolated by halving).

        A transient failure (Postgres away) propagates: the caller keeps the
        whole batch, and rewriting the rows already written is harmless.
        """
        try:
            await self._write(kind, rows)
        except Exception as exc:
            if _transient(exc):
                raise
            if len(rows) == 1:
                log.error(  # noqa: TRY400 - the reason is enough; no traceback in the log
                    "audit_row_rejected", kind=kind, reason=type(exc).__name__
                )
                return list(rows)
        else:
            return []
        middle = len(rows) // 2
        return [*await self._store(kind, rows[:middle]), *await self._store(kind, rows[middle:])]

    async def _store_all(self, kind: str, rows: Sequence[AuditRow] | Sequence[PromptRow]) -> None:
        """Write ``rows`` in batches, setting aside what Postgres refuses (transient: raises)."""
        for start in range(0, len(rows), self._batch_size):
            rejected = await self._store(kind, rows[start : start + self._batch_size])
            if rejected:
                await self._set_aside(kind, rejected)

    async def _set_aside(self, kind: str, rows: Sequence[AuditRow | PromptRow]) -> None:
        data = b"".join(encode_row(r) + b"\n" for r in rows)
        await asyncio.to_thread(self._write_spool_file, kind, data, ".bad")

    async def _write(self, kind: str, rows: Sequence[AuditRow] | Sequence[PromptRow]) -> None:
        statement = _INSERT_AUDIT if kind == "audit" else _INSERT_PROMPT
        args = [_audit_args(r) if isinstance(r, AuditRow) else _prompt_args(r) for r in rows]
        async with asyncio.timeout(self._write_timeout), self._pool.acquire() as conn:
            await conn.executemany(statement, args)

    # -- spool ----------------------------------------------------------------------

    def _spool_files(self) -> list[Path]:
        return sorted(self.spool_dir.glob("*.jsonl"))

    async def _spool(self, kind: str, rows: Sequence[AuditRow] | Sequence[PromptRow]) -> None:
        data = b"".join(encode_row(r) + b"\n" for r in rows)
        await asyncio.to_thread(self._write_spool_file, kind, data)
        self.spooled_files += 1

    def _write_spool_file(self, kind: str, data: bytes, suffix: str = ".jsonl") -> None:
        # time first so that a sorted listing replays oldest first
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-{kind}{suffix}"
        tmp = self.spool_dir / (name + ".tmp")
        # rows and prompt text: readable by the writer's user alone (not the umask's 0644)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.spool_dir / name)
        dir_fd = os.open(self.spool_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def _replay_loop(self) -> None:
        while not self._stopping.is_set():
            await wait_set(self._replay_now, self._retry_interval)
            if self._stopping.is_set():
                return
            self._replay_now.clear()
            await self._retry_unkept()
            try:
                await self.replay_spool()
            except OSError as exc:  # a file it could not list, move or remove: next time
                log.warning(
                    "audit_replay_failed",
                    reason=type(exc).__name__,
                    errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                )

    async def replay_spool(self) -> int:
        """Write spool files, then dead processes' journals; how many files were written.

        Oldest spool files first; a journal of a process that is gone is
        claimed (locked) and counted in :meth:`pending_since` before the
        spool count can fall to nothing. Postgres away: the rest waits.
        """
        async with self._spool_lock:
            own = self._journal.names if self._journal is not None else set()
            # in the loop's thread (a listing and a lock try per file): a cancelled
            # claim in a worker thread would keep its locks, and the files, for good
            orphans = claim_orphans(self.spool_dir, own)
            self.orphan_journals = len(orphans)
            try:
                written, finished = await self._replay_spool_files()
                if finished:
                    written += await self._replay_journals(orphans)
            finally:
                for orphan in orphans:
                    orphan.keep()  # not written: unlocked, left for later
        if written:
            log.info("audit_spool_replayed", files=written)
            self.progress.set()
        return written

    async def _replay_spool_files(self) -> tuple[int, bool]:
        """Spool files written, oldest first; whether all were (``False``: Postgres away)."""
        written = 0
        files = self._spool_files()
        self.spooled_files = len(files)
        for path in files:
            kind = path.stem.rsplit("-", 1)[-1]
            decoder = _KINDS.get(kind)
            if decoder is None:
                continue
            try:
                done = await self._replay_file(path, kind, decoder)
            except FileNotFoundError:
                done = True  # another process sharing the spool replayed it
            if done is None:
                return written, False  # Postgres is still away: try again later
            self.spooled_files -= 1
            written += int(done)
        return written, True

    async def _replay_journals(self, orphans: list[OrphanJournal]) -> int:
        """Write and remove claimed journals (taken off ``orphans`` as they are done)."""
        written = 0
        while orphans:
            if not await self._replay_journal(orphans[0]):
                return written  # Postgres is away: the rest waits
            await asyncio.to_thread(orphans.pop(0).done)
            self.orphan_journals -= 1
            written += 1
        return written

    async def _replay_journal(self, orphan: OrphanJournal) -> bool:
        """Write one dead process's journal rows; ``False`` to retry it later."""
        try:
            data = await asyncio.to_thread(orphan.read)
        except OSError as exc:
            log.warning(
                "audit_journal_unreadable_now", file=orphan.path.name, reason=type(exc).__name__
            )
            return False
        contents = decode(data)
        if contents.torn_tail:  # the write the kill (or a full disk) cut short
            log.warning("audit_journal_torn_line_skipped", file=orphan.path.name)
        try:
            await self._store_all("audit", contents.audits)
            await self._store_all("prompt", contents.prompts)
            if contents.unreadable:
                log.error(
                    "audit_journal_lines_unreadable",
                    file=orphan.path.name,
                    lines=len(contents.unreadable),
                )
                raw = b"".join(line + b"\n" for line in contents.unreadable)
                await asyncio.to_thread(self._write_spool_file, "journal", raw, ".bad")
        except Exception:  # noqa: BLE001 - only transient failures (and a full disk) reach here
            return False
        log.info(
            "audit_journal_replayed",
            file=orphan.path.name,
            rows=len(contents.audits) + len(contents.prompts),
        )
        return True

    async def _replay_file(self, path: Path, kind: str, decoder: Any) -> bool | None:
        """Write one spool file; True when written, False when set aside, None to retry."""
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning("audit_spool_unreadable_now", file=path.name, reason=type(exc).__name__)
            return None
        try:
            rows = [decoder.decode(line) for line in data.splitlines() if line.strip()]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error(  # noqa: TRY400 - the reason is enough; no traceback in the log
                "audit_spool_unreadable", file=path.name, reason=type(exc).__name__
            )
            await asyncio.to_thread(path.rename, path.with_suffix(".bad"))
            return False
        try:
            rejected = await self._store(kind, rows)
        except Exception:  # noqa: BLE001 - only transient failures reach here
            return None
        if rejected:
            await self._set_aside(kind, rejected)
        await asyncio.to_thread(path.unlink)
        return True
