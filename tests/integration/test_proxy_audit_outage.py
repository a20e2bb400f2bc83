"""Postgres down with warm caches: requests keep being served, audit rows wait on disk."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx

from neuronetz_gateway.domain.identity import Limits
from tests.support.identity import IDENTITY_HEADER, signed
from tests.support.private_postgres import private_database
from tests.support.proxy_checks import eventually, new_ids
from tests.support.proxy_stack import SimulatorServer, running_proxy


def _spooled(spool: Path) -> list[Path]:
    return list(spool.rglob("*.jsonl"))  # one subdirectory per deployment


def _left_in(spool: Path, *, journal: bool = True) -> list[str]:
    """Every file left in the spool: waiting (.jsonl), being written (.tmp), set aside (.bad).

    ``journal=False``: without the running writer's journal (``.wal``, removed when it stops).
    """
    return sorted(
        p.name for p in spool.rglob("*") if p.is_file() and (journal or p.suffix != ".wal")
    )


def _audit_log_lines(log: Path) -> list[str]:
    """The proxy's log lines about audit rows (spooled, rejected, replayed) for a failure."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if "audit_" in line]


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}

pytest_plugins = ["tests.support.proxy_fixtures"]


async def test_postgres_outage_loses_no_audit_row_and_writes_each_once(
    sim: SimulatorServer, redis_test_url: str, redis_prefix: str
) -> None:
    async with private_database("nz_outage") as (pg, url):
        ids = new_ids()
        limits = Limits(daily_tokens=1_000_000)
        with running_proxy(
            database_url=url,
            redis_url=redis_test_url,
            redis_prefix=redis_prefix + "o",
            ollama_url=sim.url,
        ) as proxy:
            async with httpx.AsyncClient(timeout=15) as client:

                async def send(request_id: str) -> httpx.Response:
                    token = signed("chat", request_id=request_id, key_limits=limits, **ids)
                    return await client.post(
                        f"{proxy.url}/api/chat", json=CHAT, headers={IDENTITY_HEADER: token}
                    )

                # warm: model list and budget counters (rebuilt from the ledger once)
                assert (await send("req-warm")).status_code == 200
                pg.stop()
                request_ids = [f"req-out-{n}" for n in range(20)]
                for request_id in request_ids:
                    reply = await send(request_id)
                    assert reply.status_code == 200, reply.text
                assert await eventually(lambda: _spooled(proxy.spool), 10), "nothing spooled"
                pg.start()
                conn = await asyncpg.connect(url)
                try:
                    expected = {"req-warm", *request_ids}

                    async def caught_up() -> bool:
                        # every row the test expects (req-warm too: its batch may have
                        # failed as Postgres stopped), and nothing left in the spool
                        count = await conn.fetchval(
                            "SELECT count(DISTINCT request_id) FROM usage_log"
                            " WHERE request_id = ANY($1::text[])",
                            sorted(expected),
                        )
                        waiting = _left_in(proxy.spool, journal=False)
                        return bool(count == len(expected) and not waiting)

                    if not await eventually(caught_up, 30):
                        present = {
                            r["request_id"]
                            for r in await conn.fetch("SELECT request_id FROM usage_log")
                        }
                        raise AssertionError(
                            f"missing rows {sorted(expected - present)}; "
                            f"spool {_left_in(proxy.spool)}; "
                            f"audit log {_audit_log_lines(proxy.log)}"
                        )
                    rows = await conn.fetch(
                        "SELECT request_id, count(*) AS n FROM usage_log GROUP BY request_id"
                    )
                finally:
                    await conn.close()
        written = {r["request_id"]: r["n"] for r in rows}
        assert set(written) == {"req-warm", *request_ids}
        assert set(written.values()) == {1}  # each exactly once
        assert not _left_in(proxy.spool)  # nothing waiting, nothing set aside, no journal
