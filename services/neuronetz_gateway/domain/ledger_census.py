"""When the usage ledger in Postgres is complete enough to rebuild a budget from.

Budget counters lost from Redis (a restart) are rebuilt from the ledger. A
row still in an audit writer's queue or spool is not in the ledger yet, so a
rebuild before it is written would charge the key less than it spent. Every
audit writer therefore reports, in Redis, since when it holds unwritten rows
(a *census* entry, refreshed every beat and after every write); a rebuild
waits until every live writer's unwritten rows are newer than the rebuild
itself. No entry at all (Redis just restarted, no writer has reported yet)
means "unknown", and the rebuild waits too: failing closed.

An entry speaks only for the rows submitted before it was written: a writer
that said "nothing pending" a moment before the rebuild may have queued a row
since. So a rebuild also waits until every live writer has reported *after*
the rebuild began (one beat at most, or the writer's next write).

Entry value: ``"<expires unix ms>:<pending since unix s>:<reported at unix s>"``,
the second part empty when the writer holds nothing; ``0`` means "rows in
the spool" (older than anything). An entry without the third part (a writer
of an earlier release, during a rolling upgrade) is judged by the first two.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from urllib.parse import urlsplit

__all__ = ["census_entry", "census_key", "ledger_complete", "spool_namespace", "stale_entries"]


def census_key(prefix: str) -> str:
    """The Redis hash of the writers' entries (its own hash tag: one slot)."""
    return f"{prefix}:{{ledger}}:writers"


def census_entry(*, expires_ms: int, pending_since: float | None, reported_at: float) -> str:
    """One writer's entry: valid until ``expires_ms``; unwritten rows since ``pending_since``,
    as read at ``reported_at``."""
    since = "" if pending_since is None else f"{pending_since:.6f}"
    return f"{expires_ms}:{since}:{reported_at:.6f}"


def _parse(value: str | bytes) -> tuple[int, float | None, float | None] | None:
    text = value.decode() if isinstance(value, bytes) else value
    expires, _, rest = text.partition(":")
    since, _, reported = rest.partition(":")
    try:
        return (
            int(expires),
            float(since) if since else None,
            float(reported) if reported else None,
        )
    except ValueError:
        return None


def ledger_complete(
    entries: Mapping[str | bytes, str | bytes], *, rebuild_at: float, now_ms: int
) -> bool:
    """Whether a rebuild started at ``rebuild_at`` (unix s) may read the ledger now.

    True when at least one writer's entry is live, every live writer reported
    after ``rebuild_at`` and none holds a row older than it. Unreadable entries
    count as "holds rows".
    """
    live = 0
    for value in entries.values():
        parsed = _parse(value)
        if parsed is None:
            return False
        expires_ms, since, reported_at = parsed
        if expires_ms <= now_ms:
            continue
        live += 1
        if reported_at is not None and reported_at < rebuild_at:
            return False  # rows it queued since its report are unknown
        if since is not None and since < rebuild_at:
            return False
    return live > 0


def stale_entries(entries: Mapping[str | bytes, str | bytes], *, now_ms: int) -> list[str | bytes]:
    """The fields of writers whose entry expired (gone without saying so)."""
    stale = []
    for field, value in entries.items():
        parsed = _parse(value)
        if parsed is not None and parsed[0] <= now_ms:
            stale.append(field)
    return stale


def spool_namespace(database_url: str, redis_prefix: str) -> str:
    """The spool subdirectory of one deployment: its database and Redis prefix.

    Two deployments (or test stacks) on one host share the spool root but
    never a directory, so a row is only ever replayed into the database it
    was meant for. Readable part (host, port, database, prefix) plus a hash
    of the whole identity; credentials never appear.
    """
    parts = urlsplit(database_url)
    database = parts.path.lstrip("/") or "-"
    host = parts.hostname or "local"
    port = parts.port or 5432
    identity = f"{host}:{port}/{database}|{redis_prefix}"
    digest = sha256(identity.encode()).hexdigest()[:12]
    readable = f"{host}-{port}-{database}-{redis_prefix}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in readable)[:80]
    return f"{safe}-{digest}"
