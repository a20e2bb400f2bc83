"""After Postgres restarts, the first read on a connection the restart closed still answers.

asyncpg finds a pooled connection closed only when a query uses it; the
request-path reads (key lookup, ledger totals, revocations, backends) try
once more on a fresh one (issue 13), so the first request after Postgres is
back is not refused. Real Postgres: a throwaway cluster, restarted here.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from tests.integration.auth_helpers import make_key
from tests.support.private_postgres import private_database

pytestmark = pytest.mark.integration


async def test_request_path_reads_survive_a_postgres_restart() -> None:
    async with private_database("nz_restart") as (pg, url):
        pool = await open_pool(url, min_size=2, max_size=2)
        try:
            store = Store(pool)
            made = await make_key(store)
            now = datetime.now(UTC)
            reads = {
                "key lookup": lambda: store.find_key_for_auth(made.record.prefix),
                "ledger totals": lambda: store.ledger_totals(
                    tenant_id=made.record.tenant_id,
                    key_id=None,
                    day_start=now,
                    month_start=now,
                ),
                "revocations": lambda: store.revoked_keys([made.record.id]),
                "backends": store.list_backends,
            }
            for name, read in reads.items():
                await read()  # the pool's connections are open and idle
                pg.stop()
                pg.start()
                await read()  # the first read after the restart: no error
                assert await read() is not None, name
        finally:
            await pool.close()
