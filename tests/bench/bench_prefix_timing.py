"""Benchmark: does response time tell whether a key prefix exists?

Times ``/authorize`` in-process (the real app on real Postgres and Redis,
OWASP Argon2 parameters) for valid-checksum keys under an *unknown* prefix
and wrong secrets under a *known* one, each a new key (no cache helps),
interleaved, and prints the medians and their ratio (1.0 = no oracle).
Measurements only; no test asserts timings.

    .venv/bin/python -m tests.bench.bench_prefix_timing --samples 200
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import asyncpg

from neuronetz_gateway.adapters.hashing import KeyHasher
from neuronetz_gateway.adapters.postgres.migrate import apply_migrations
from neuronetz_gateway.adapters.postgres.store import Store, open_pool
from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys
from neuronetz_gateway.domain.keys import generate_key
from neuronetz_gateway.domain.policy import PolicySettings
from tests.conftest import TEST_SECRET
from tests.integration.auth_helpers import authorize, make_settings, running_app
from tests.support.servers import postgres_admin_url, redis_url


async def _run(admin_url: str, redis: str, samples: int) -> None:
    name = f"nz_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        await apply_migrations(url)
        pool = await open_pool(url)
        store = Store(pool)
        await store.create_tenant("bench", PolicySettings())
        key = generate_key()
        await store.create_key(
            tenant_name="bench",
            name="k",
            prefix=key.prefix,
            secret_hash=KeyHasher().hash(key.full),
            policy=PolicySettings(),
            expires_at=None,
            log_prompts=False,
            prompt_ttl_days=None,
            secret_fingerprint=FingerprintKeys(TEST_SECRET.encode()).make(key.full),
        )
        settings = make_settings(url, redis, f"nzb{secrets.token_hex(3)}")
        unknown: list[float] = []
        known: list[float] = []
        async with running_app(settings, store, KeyHasher()) as (client, _):
            for _ in range(samples):
                for prefix, into in ((generate_key().prefix, unknown), (key.prefix, known)):
                    started = time.perf_counter()
                    answer = await authorize(client, generate_key(prefix).full)
                    into.append((time.perf_counter() - started) * 1000)
                    assert answer.status_code == 401
        await pool.close()
        a, b = statistics.median(unknown), statistics.median(known)
        print(f"median ms over {samples}: unknown prefix {a:.2f}, known, wrong secret {b:.2f}")
        print(f"ratio known/unknown {b / a:.2f}")
    finally:
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with postgres_admin_url() as admin, redis_url() as redis:
        asyncio.run(_run(admin, redis, args.samples))


if __name__ == "__main__":
    main()
