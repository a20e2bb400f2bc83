"""A Redis restart during a Postgres outage never resets a spent budget (issue 13, item 4).

The sequence from the issue, made deterministic by holding the spool replay:
Postgres goes down, a key spends 90 of its 100 tokens (the audit row waits in
the spool), Redis restarts (the counters are gone), Postgres comes back. The
first decisions must not rebuild the counters from a ledger that lacks the
spooled 90: they fail closed while the row is unwritten, and once it is
written the rebuilt counter holds the 90, so another 90 is refused.
Real Postgres (a throwaway cluster, stopped and started here), real Redis (a
throwaway server, restarted here), the real audit writer, beacon and limiter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from neuronetz_gateway.adapters.audit_writer import AuditWriter
from neuronetz_gateway.adapters.ledger_census import CompleteLedger, LedgerBeacon
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.adapters.redis_client import close_redis, open_redis
from neuronetz_gateway.adapters.redis_commands import command_channel
from neuronetz_gateway.adapters.redis_limiter import Limiter, LimiterUnavailable
from neuronetz_gateway.domain.accounting import AuditRow
from neuronetz_gateway.domain.identity import Limits
from neuronetz_gateway.domain.policy import PolicySettings
from tests.integration.auth_helpers import make_key
from tests.support.private_postgres import private_database
from tests.support.proxy_checks import eventually
from tests.support.servers import ThrowawayPostgres, ThrowawayRedis

pytestmark = pytest.mark.integration

BUDGET = Limits(total_tokens=100)
NONE = Limits()


@pytest.fixture
async def private_db() -> AsyncIterator[tuple[ThrowawayPostgres, str]]:
    """A migrated database in a Postgres of our own (this test stops and starts it)."""
    async with private_database("nz_rebuild") as db:
        yield db


def _row(request_id: str, tenant_id: int, key_id: int, tokens: int) -> AuditRow:
    return AuditRow(
        request_id=request_id,
        ts=datetime.now(UTC),
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix="nz_rebuild0",
        route="chat",
        model="llama3.2",
        status=200,
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        ttfb_ms=1,
        duration_ms=2,
        streamed=False,
        client_disconnected=False,
        estimated=False,
    )


async def test_a_redis_restart_during_a_postgres_outage_keeps_the_spent_budget(
    private_db: tuple[ThrowawayPostgres, str], tmp_path: Path
) -> None:
    pg, url = private_db
    redis_server = ThrowawayRedis()
    pool = await open_pool(url, min_size=0, max_size=4)
    redis = await open_redis(redis_server.url)
    commands = command_channel(redis, 2.0)
    store = Store(pool)
    writer = AuditWriter(pool, tmp_path, flush_interval=0.05, retry_interval=0.1)
    beacon = LedgerBeacon(commands, prefix="nzr", writer=writer, beat_seconds=0.1)
    limiter = Limiter(
        redis,
        prefix="nzr",
        ledger=CompleteLedger(store, commands, prefix="nzr"),
        timeout_seconds=2.0,
        ledger_timeout_seconds=1.5,
    )
    try:
        made = await make_key(store, key=PolicySettings(total_tokens=100))
        ids = {"tenant_id": made.record.tenant_id, "key_id": made.record.id}
        await writer.start()
        await beacon.start()

        async def spend(request_id: str, tokens: int) -> bool:
            decision = await limiter.reserve(
                **ids,
                key_limits=BUDGET,
                tenant_limits=NONE,
                request_id=request_id,
                tokens=tokens,
            )
            if not decision.allowed:
                return False
            await limiter.settle(
                **ids, reserved=tokens, actual=tokens, reserved_at=datetime.now(UTC).timestamp()
            )
            writer.submit(_row(request_id, made.record.tenant_id, made.record.id, tokens))
            return True

        # the counters, rebuilt from the (empty) ledger while Postgres is up
        warm = await limiter.admit(
            **ids, key_limits=BUDGET, tenant_limits=NONE, request_id="req-rb-0"
        )
        assert warm.allowed
        pg.stop()
        assert await spend("req-rb-1", 90)
        assert await eventually(lambda: writer.spooled_files >= 1, 10), "the row never spooled"

        redis_server.stop()  # keeps nothing on disk: every counter is gone
        redis_server.start()
        async with writer.replay_held():
            pg.start()

            async def postgres_answers() -> bool:
                try:
                    return bool(await pool.fetchval("SELECT 1"))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    return False

            assert await eventually(postgres_answers, 10), "Postgres did not come back"
            # the ledger lacks the spooled 90: rebuilding now would allow another 90
            with pytest.raises(LimiterUnavailable):
                await spend("req-rb-2", 90)
        # replayed: the rebuilt counter holds what was spent
        assert await eventually(lambda: writer.pending_since() is None, 10), "never replayed"
        assert not await spend("req-rb-3", 90)
        assert await spend("req-rb-4", 10)  # what is left is still there
    finally:
        await beacon.stop()
        await writer.stop()
        await limiter.aclose()
        await commands.aclose()
        await close_redis(redis)
        await pool.close()
        redis_server.stop()


class _Holding:
    """What the beacon reports on: rows unwritten since ``since`` (None: nothing held)."""

    def __init__(self, since: float | None) -> None:
        self.since = since
        self.progress = asyncio.Event()

    def pending_since(self) -> float | None:
        return self.since


@pytest.mark.parametrize("holding", [None, 0.0])
async def test_a_stopped_writer_holding_nothing_leaves_no_entry_to_wait_for(
    holding: float | None,
) -> None:
    # an entry left by a writer that stopped says nothing of the time after it: every
    # rebuild then waited (failing closed) until it expired, 3 s (a stack restarted in
    # that time answered its first budget decisions 503)
    redis_server = ThrowawayRedis()
    redis = await open_redis(redis_server.url)
    commands = command_channel(redis, 2.0)
    try:
        writer = _Holding(holding)
        beacon = LedgerBeacon(commands, prefix="nzs", writer=writer, beat_seconds=0.1)
        await beacon.start()
        ledger = CompleteLedger(_NoLedger(), commands, prefix="nzs")
        await beacon.stop()
        entries = await commands.execute("HGETALL", "nzs:{ledger}:writers")
        if holding is None:
            assert not entries  # gone: nothing to wait for
        else:  # rows in its spool: the entry stays (and expires by itself)
            assert entries
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ledger.wait_complete(time.time()), 0.5)
    finally:
        await commands.aclose()
        await close_redis(redis)
        redis_server.destroy()


class _NoLedger:
    async def ledger_totals(self, **_: object) -> object:  # pragma: no cover - not asked
        raise AssertionError("not asked")
