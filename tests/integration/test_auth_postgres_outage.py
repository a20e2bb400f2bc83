"""A replica started during a Postgres outage serves the keys warm in the shared cache."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.auth.app import create_app
from neuronetz_gateway.devstack.servers import ThrowawayPostgres
from tests.integration.auth_helpers import authorize, cheap_hasher, make_key, make_settings
from tests.support.cli import run_cli


async def test_replica_started_while_postgres_is_down(
    redis_test_url: str, redis_prefix: str
) -> None:
    server = ThrowawayPostgres()
    try:
        admin = await asyncpg.connect(server.admin_url)
        await admin.execute("CREATE DATABASE outage")
        await admin.close()
        url = server.admin_url.rsplit("/", 1)[0] + "/outage"
        # piccolo keeps one engine per process: migrate this second database in a child
        await asyncio.to_thread(run_cli, url, "migrate")
        pool = await open_pool(url, min_size=0, max_size=2)
        store = Store(pool)
        warm, cold = await make_key(store), await make_key(store)
        await pool.close()
        settings = make_settings(url, redis_test_url, redis_prefix + "pgout")

        # Replica A (opening its own pool, as in production) warms the shared cache.
        first = create_app(settings, hasher=cheap_hasher())
        async with first.lifespan(), _client(first) as client:
            assert (await authorize(client, warm.full)).status_code == 200

        server.stop()
        # Replica B starts now, with Postgres down.
        second = create_app(settings, hasher=cheap_hasher())
        async with second.lifespan(), _client(second) as client:
            assert (await authorize(client, warm.full)).status_code == 200
            refused = await authorize(client, cold.full)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503

            server.start()  # and B recovers without a restart
            started = time.monotonic()
            while (await authorize(client, cold.full)).status_code != 200:
                assert time.monotonic() - started < 10.0
                await asyncio.sleep(0.1)
    finally:
        server.destroy()


def _client(app: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://auth")


class _BrokenLimiter:
    """A limiter with a bug: the decision must still fail closed, in the right dialect."""

    async def admit(self, **_: object) -> None:
        raise RuntimeError("a bug")

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def test_a_bug_fails_closed_in_the_routes_dialect(
    database_url: str, redis_test_url: str, redis_prefix: str, store: Store
) -> None:
    made = await make_key(store)
    settings = make_settings(database_url, redis_test_url, redis_prefix)
    app = create_app(
        settings, store=store, hasher=cheap_hasher(), limiter=_BrokenLimiter(), listen=False
    )  # type: ignore[arg-type]
    async with app.lifespan(), _client(app) as client:
        native = await authorize(client, made.full, uri="/api/chat")
        openai = await authorize(client, made.full, uri="/v1/chat/completions")
    assert native.status_code == openai.status_code == 503
    assert isinstance(native.json()["error"], str)
    assert openai.json()["error"]["type"] == "server_error"
    assert "x-nz-identity" not in native.headers and "x-nz-identity" not in openai.headers
