"""What the Redis record store does of its own, on a real server (the identity rules over it are
in `test_service.py`): tokens that expire as keys, and no partial records."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import redis.asyncio as aioredis

from service.identity import RedisIdentityStore
from service.identity.redis import RedisRecords


def test_redis_token_keys_expire_with_the_token(redis_server) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"

    async def main() -> int:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            store = RedisIdentityStore(client, "test-master-key-not-for-production", prefix=prefix)
            acme = await store.create_domain("acme")
            alice = await store.create_user(acme.id, "alice", "correct horse battery staple")
            project_id = (await store.create_project(acme.id, "cn-north-4")).id
            _, record = await store.issue_token(alice.id, project_id, ttl=timedelta(minutes=10))
            return await client.pttl(f"{prefix}token:{record.id}")
        finally:
            await client.aclose()

    assert 590_000 < asyncio.run(main()) <= 600_000


def test_an_update_of_a_missing_record_creates_nothing(redis_server) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            records = RedisRecords(client, prefix=prefix)
            # A token that expired (its key gone) must not come back as a half record without a TTL.
            assert await records.revoke_token("0" * 64) is False
            assert await records.set_user_enabled("0" * 32, False) is False
            assert [key async for key in client.scan_iter(match=prefix + "*")] == []
        finally:
            await client.aclose()

    asyncio.run(main())
