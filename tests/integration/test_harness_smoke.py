import redis.asyncio as aioredis

from neuronetz_gateway.adapters.postgres.store import Store


async def test_database_is_migrated(store: Store) -> None:
    tables = {
        r["tablename"]
        for r in await store.pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
    }
    assert {"tenant", "api_key", "usage_log", "prompt_log"} <= tables


async def test_redis_answers(redis_test_url: str) -> None:
    client = aioredis.from_url(redis_test_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
