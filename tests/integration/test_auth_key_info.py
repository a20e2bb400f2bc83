"""The key-info routes through /authorize: the key's state is signed into the identity,
reading it costs no RPM and takes no lease, and only a valid key gets one."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from neuronetz_gateway.adapters.postgres.store import Store
from neuronetz_gateway.domain.identity import IDENTITY_HEADER, Identity, verify_identity
from neuronetz_gateway.domain.policy import PolicySettings
from neuronetz_gateway.settings import Settings
from tests.conftest import TEST_SECRET
from tests.integration.auth_helpers import authorize, make_key, make_settings, running_app

pytestmark = pytest.mark.integration

KEY_ROUTES = [("/v1/key", "v1.key"), ("/api/key", "key")]


@pytest.fixture
def settings(database_url: str, redis_test_url: str, redis_prefix: str) -> Settings:
    return make_settings(database_url, redis_test_url, redis_prefix)


def _identity(answer: httpx.Response) -> Identity:
    assert answer.status_code == 200, answer.text
    return verify_identity(answer.headers[IDENTITY_HEADER], TEST_SECRET.encode(), 0)


async def _key_info(client: httpx.AsyncClient, key: str | None, uri: str) -> httpx.Response:
    return await authorize(client, key, method="GET", uri=uri)


@pytest.mark.parametrize(("uri", "route"), KEY_ROUTES)
async def test_key_info_carries_the_state_and_costs_no_rpm(
    settings: Settings, store: Store, uri: str, route: str
) -> None:
    made = await make_key(store, key=PolicySettings(rpm=2, concurrency=1))
    async with running_app(settings, store) as (client, _):
        for _ in range(5):
            identity = _identity(await _key_info(client, made.full, uri))
            assert identity.route == route
            assert identity.lease_id is None  # no concurrency slot taken
            assert identity.key_state is not None
            assert identity.key_state.key.requests is not None
            assert identity.key_state.key.requests.used == 0
        # the five reads left the whole RPM to the model routes
        chat = await authorize(client, made.full)
        assert chat.status_code == 200
        assert (await authorize(client, made.full)).status_code == 429  # the lease is held
        # spent (lease held, 2 of 2 would be next): the key can still ask what it has left
        identity = _identity(await _key_info(client, made.full, uri))
        assert identity.key_state is not None
        assert identity.key_state.key.requests is not None
        assert identity.key_state.key.requests.used == 1
        assert identity.key_state.key.concurrency == 1
        assert identity.allowance.remaining_requests == 1


async def test_other_routes_carry_no_state(settings: Settings, store: Store) -> None:
    made = await make_key(store, key=PolicySettings(rpm=5))
    async with running_app(settings, store) as (client, _):
        identity = _identity(await authorize(client, made.full))
    assert identity.key_state is None


async def test_a_bad_key_gets_the_same_401_on_the_key_routes(
    settings: Settings, store: Store
) -> None:
    made = await make_key(store)
    await store.revoke_key(made.record.prefix)
    async with running_app(settings, store) as (client, _):
        for uri in ("/v1/key", "/api/key"):
            answers = await asyncio.gather(
                _key_info(client, None, uri),
                _key_info(client, "nz_garbage", uri),
                _key_info(client, made.full, uri),
                _key_info(client, made.full, uri + "/"),
            )
            assert [a.status_code for a in answers[:3]] == [401, 401, 401]
            assert len({a.content for a in answers[:3]}) == 1
            assert IDENTITY_HEADER not in answers[0].headers
            assert answers[3].status_code == 404
        wrong_method = await authorize(client, made.full, method="POST", uri="/v1/key")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
