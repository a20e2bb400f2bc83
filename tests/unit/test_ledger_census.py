"""The ledger-census rule: when a budget may be rebuilt from the Postgres ledger."""

from __future__ import annotations

from neuronetz_gateway.domain.ledger_census import (
    census_entry,
    ledger_complete,
    spool_namespace,
    stale_entries,
)

NOW_MS = 1_000_000_000


def _entry(
    pending_since: float | None, *, alive: bool = True, reported_at: float = 999_000.5
) -> str:
    return census_entry(
        expires_ms=NOW_MS + (3000 if alive else -1),
        pending_since=pending_since,
        reported_at=reported_at,
    )


def test_no_live_writer_means_unknown_and_waits() -> None:
    assert not ledger_complete({}, rebuild_at=999_000.0, now_ms=NOW_MS)
    dead = {"w1": _entry(None, alive=False)}
    assert not ledger_complete(dead, rebuild_at=999_000.0, now_ms=NOW_MS)
    assert stale_entries(dead, now_ms=NOW_MS) == ["w1"]


def test_idle_writers_and_rows_newer_than_the_rebuild_allow_it() -> None:
    entries = {"w1": _entry(None), b"w2": _entry(999_001.0).encode()}
    assert ledger_complete(entries, rebuild_at=999_000.0, now_ms=NOW_MS)
    assert stale_entries(entries, now_ms=NOW_MS) == []


def test_older_unwritten_rows_or_a_spool_hold_it() -> None:
    assert not ledger_complete(
        {"w1": _entry(None), "w2": _entry(998_999.5)}, rebuild_at=999_000.0, now_ms=NOW_MS
    )
    assert not ledger_complete({"w1": _entry(0.0)}, rebuild_at=999_000.0, now_ms=NOW_MS)
    # a dead writer's old rows no longer hold anyone (its entry expired)
    assert ledger_complete(
        {"w1": _entry(None), "w2": _entry(0.0, alive=False)}, rebuild_at=999_000.0, now_ms=NOW_MS
    )


def test_a_report_from_before_the_rebuild_holds_it_until_the_writer_reports_again() -> None:
    # "nothing pending" at 999 s says nothing of a row queued between then and the rebuild
    before = {"w1": _entry(None, reported_at=998_999.8), "w2": _entry(None)}
    assert not ledger_complete(before, rebuild_at=999_000.0, now_ms=NOW_MS)
    after = {"w1": _entry(None, reported_at=999_000.1), "w2": _entry(None)}
    assert ledger_complete(after, rebuild_at=999_000.0, now_ms=NOW_MS)


def test_an_entry_of_an_earlier_release_is_judged_by_what_it_says() -> None:
    # "<expires>:<since>" without the report time (rolling upgrade)
    assert ledger_complete({"w1": f"{NOW_MS + 3000}:"}, rebuild_at=999_000.0, now_ms=NOW_MS)
    assert not ledger_complete(
        {"w1": f"{NOW_MS + 3000}:998999.0"}, rebuild_at=999_000.0, now_ms=NOW_MS
    )


def test_an_unreadable_entry_fails_closed() -> None:
    assert not ledger_complete({"w1": "garbage"}, rebuild_at=999_000.0, now_ms=NOW_MS)


def test_spool_namespaces_separate_deployments_and_hide_credentials() -> None:
    a = spool_namespace("postgresql://u:secret@db.example:5432/gw", "nz")
    assert "secret" not in a and "u:" not in a
    assert a.startswith("db.example-5432-gw-nz-")
    assert a == spool_namespace("postgresql://other:pw@db.example:5432/gw", "nz")
    assert a != spool_namespace("postgresql://u:secret@db.example:5432/gw2", "nz")
    assert a != spool_namespace("postgresql://u:secret@db.example:5432/gw", "nz2")
    assert "/" not in spool_namespace("postgresql:///gw?host=/run/postgresql", "a/b")
