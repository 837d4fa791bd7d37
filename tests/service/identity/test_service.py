"""The identity rules (`service.identity.service`) over both record stores: SQLite in tmp_path,
Redis on a real server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.identity import (
    DEFAULT_TOKEN_TTL,
    IdentityConflict,
    IdentityNotFound,
    IdentityStore,
    MasterKeyMismatch,
    RedisIdentityStore,
    SqliteIdentityStore,
    crypto,
)

pytestmark = pytest.mark.anyio
MASTER_KEY = "test-master-key-not-for-production"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backend:
    """Opens stores over one shared storage (a file, or a key prefix) and reads it raw."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "identity.sqlite3"
        self.redis_url = redis_url
        self.prefix = f"test-{uuid.uuid4().hex}:"
        self.stores: list[IdentityStore] = []
        self.clients: list[aioredis.Redis] = []

    async def open(self, master_key: str = MASTER_KEY) -> IdentityStore:
        store: IdentityStore
        if self.kind == "sqlite":
            store = SqliteIdentityStore(self.path, master_key)
        else:
            # Its own client each time: a second gateway replica, not a second handle on one.
            client = aioredis.Redis.from_url(self.redis_url)
            self.clients.append(client)
            store = RedisIdentityStore(client, master_key, prefix=self.prefix)
        self.stores.append(store)
        return store

    async def raw(self) -> bytes:
        """Everything the backend has stored, as bytes."""
        if self.kind == "sqlite":
            # The WAL holds recent writes until a checkpoint: read it as well as the main file.
            return b"".join(p.read_bytes() for p in sorted(self.path.parent.glob("identity.sqlite3*")))
        client = aioredis.Redis.from_url(self.redis_url)
        dump = []
        async for key in client.scan_iter(match=self.prefix + "*"):
            dump.append(key)
            kind = await client.type(key)
            dump.append(repr(await (client.hgetall(key) if kind == b"hash" else client.smembers(key))).encode())
        await client.aclose()
        return b"\n".join(dump)

    async def aclose(self) -> None:
        for store in self.stores:
            await store.close()
        for client in self.clients:
            await client.aclose()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    opened = Backend(request.param, tmp_path, redis_url)
    yield opened
    await opened.aclose()


@pytest.fixture
async def store(backend: Backend) -> IdentityStore:
    return await backend.open()


async def test_domains_create_get_find_list(store: IdentityStore) -> None:
    acme = await store.create_domain("acme")
    beta = await store.create_domain("beta")
    assert re.fullmatch(r"[0-9a-f]{32}", acme.id)
    assert await store.get_domain(acme.id) == acme
    assert await store.find_domain("beta") == beta
    assert await store.find_domain("gamma") is None
    assert await store.get_domain("0" * 32) is None
    assert await store.list_domains() == [acme, beta]


async def test_duplicate_or_blank_domain_name_refused(store: IdentityStore) -> None:
    await store.create_domain("acme")
    with pytest.raises(IdentityConflict, match="acme"):
        await store.create_domain("acme")
    with pytest.raises(ValueError):
        await store.create_domain("")
    assert len(await store.list_domains()) == 1


async def test_users_unique_within_their_domain(store: IdentityStore) -> None:
    acme, beta = await store.create_domain("acme"), await store.create_domain("beta")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    bob = await store.create_user(acme.id, "bob", PASSWORD)
    other_alice = await store.create_user(beta.id, "alice", PASSWORD)
    assert alice.enabled and alice.domain_id == acme.id and alice.id != other_alice.id
    assert await store.get_user(alice.id) == alice
    assert await store.find_user(acme.id, "alice") == alice
    assert await store.find_user(beta.id, "alice") == other_alice
    assert await store.find_user(beta.id, "bob") is None
    assert await store.list_users(acme.id) == [alice, bob]
    with pytest.raises(IdentityConflict):
        await store.create_user(acme.id, "alice", "another password")
    with pytest.raises(IdentityNotFound):
        await store.create_user("0" * 32, "carol", PASSWORD)
    assert not {"password", "password_hash"} & {f.name for f in fields(alice)}


async def test_projects_and_rate_limit_override(store: IdentityStore) -> None:
    acme, beta = await store.create_domain("acme"), await store.create_domain("beta")
    north = await store.create_project(acme.id, "cn-north-4")
    south = await store.create_project(acme.id, "cn-south-1")
    elsewhere = await store.create_project(beta.id, "cn-north-4")
    assert re.fullmatch(r"[0-9a-f]{32}", north.id) and north.id != elsewhere.id
    assert (north.rate_per_second, north.burst) == (None, None)
    assert await store.get_project(north.id) == north
    assert await store.find_project(acme.id, "cn-north-4") == north
    assert await store.find_project(beta.id, "cn-south-1") is None
    assert await store.list_projects(acme.id) == [north, south]
    with pytest.raises(IdentityConflict):
        await store.create_project(acme.id, "cn-north-4")
    with pytest.raises(IdentityNotFound):
        await store.create_project("0" * 32, "cn-north-4")

    limited = await store.set_project_rate_limit(north.id, 2.5, 10)
    assert (limited.rate_per_second, limited.burst) == (2.5, 10)
    assert await store.get_project(north.id) == limited
    assert (await store.set_project_rate_limit(north.id, None, 4)).rate_per_second is None
    cleared = await store.set_project_rate_limit(north.id, None, None)
    assert (cleared.rate_per_second, cleared.burst) == (None, None)
    with pytest.raises(ValueError):
        await store.set_project_rate_limit(north.id, 0, 1)
    with pytest.raises(ValueError):
        await store.set_project_rate_limit(north.id, 1, 0)
    with pytest.raises(IdentityNotFound):
        await store.set_project_rate_limit("0" * 32, 1, 1)
    assert await store.get_project("0" * 32) is None


async def test_authenticate(store: IdentityStore) -> None:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    assert await store.authenticate("acme", "alice", PASSWORD) == alice
    assert await store.authenticate("acme", "alice", PASSWORD + " ") is None
    assert await store.authenticate("acme", "nobody", PASSWORD) is None
    assert await store.authenticate("nowhere", "alice", PASSWORD) is None

    await store.set_user_enabled(alice.id, False)
    assert (await store.get_user(alice.id)).enabled is False
    assert await store.authenticate("acme", "alice", PASSWORD) is None
    await store.set_user_enabled(alice.id, True)
    assert await store.authenticate("acme", "alice", PASSWORD) is not None
    with pytest.raises(IdentityNotFound):
        await store.set_user_enabled("0" * 32, False)


async def test_unknown_names_cost_the_same_kdf_work(
    store: IdentityStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = await store.create_domain("acme")
    await store.create_user(acme.id, "alice", PASSWORD)
    calls: list[int] = []
    real = crypto._scrypt
    monkeypatch.setattr(crypto, "_scrypt", lambda *a: calls.append(a[2]) or real(*a))
    for domain, user in [("acme", "alice"), ("acme", "nobody"), ("nowhere", "alice")]:
        calls.clear()
        await store.authenticate(domain, user, "wrong")
        assert calls == [crypto.SCRYPT_N], (domain, user)


async def test_secret_returned_once_and_decryptable(store: IdentityStore) -> None:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    key, secret = await store.create_access_key(alice.id, "ci runner")
    assert re.fullmatch(r"[A-Z0-9]{20}", key.ak)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret)
    assert (key.user_id, key.domain_id, key.enabled, key.description) == (alice.id, acme.id, True, "ci runner")
    assert await store.get_access_key(key.ak) == key
    assert secret not in repr(await store.get_access_key(key.ak))
    assert secret not in repr(await store.list_access_keys(alice.id))
    assert await store.secret_for(key.ak) == secret
    second, second_secret = await store.create_access_key(alice.id)
    assert second_secret != secret
    assert await store.list_access_keys(alice.id) == [key, second]
    assert await store.secret_for("AKUNKNOWN00000000000") is None
    with pytest.raises(IdentityNotFound):
        await store.create_access_key("0" * 32)


async def test_storage_holds_no_plaintext_password_secret_or_token(
    backend: Backend, store: IdentityStore
) -> None:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    key, secret = await store.create_access_key(alice.id)
    token, record = await store.issue_token(alice.id, (await store.create_project(acme.id, "r1")).id)
    raw = await backend.raw()
    # The dump must see the data at all, or the absences below would prove nothing.
    assert key.ak.encode() in raw and alice.id.encode() in raw and record.id.encode() in raw
    assert record.id == hashlib.sha256(token.encode()).hexdigest()
    for plaintext in (PASSWORD, secret, token):
        assert plaintext.encode() not in raw


async def test_other_master_key_cannot_decrypt(backend: Backend, store: IdentityStore) -> None:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    key, _ = await store.create_access_key(alice.id)
    intruder = await backend.open(master_key="some-other-master-key")
    assert await intruder.get_access_key(key.ak) == key
    with pytest.raises(MasterKeyMismatch, match=key.ak):
        await intruder.secret_for(key.ak)
    with pytest.raises(ValueError):
        await backend.open(master_key="")


async def test_disabled_and_deleted_keys(store: IdentityStore) -> None:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    key, secret = await store.create_access_key(alice.id)
    await store.set_access_key_enabled(key.ak, False)
    assert (await store.get_access_key(key.ak)).enabled is False
    assert await store.secret_for(key.ak) is None
    await store.set_access_key_enabled(key.ak, True)
    assert await store.secret_for(key.ak) == secret

    await store.set_user_enabled(alice.id, False)
    assert await store.secret_for(key.ak) is None
    await store.set_user_enabled(alice.id, True)

    assert await store.delete_access_key(key.ak) is True
    assert await store.get_access_key(key.ak) is None
    assert await store.secret_for(key.ak) is None
    assert await store.list_access_keys(alice.id) == []
    assert await store.delete_access_key(key.ak) is False
    with pytest.raises(IdentityNotFound):
        await store.set_access_key_enabled(key.ak, True)
    assert await store.get_access_key(key.ak) is None


async def _alice_in_north(store: IdentityStore) -> tuple[str, str]:
    acme = await store.create_domain("acme")
    alice = await store.create_user(acme.id, "alice", PASSWORD)
    return alice.id, (await store.create_project(acme.id, "cn-north-4")).id


async def test_token_valid_for_a_day(store: IdentityStore) -> None:
    user_id, project_id = await _alice_in_north(store)
    token, record = await store.issue_token(user_id, project_id)
    assert len(token) >= 64
    assert (record.user_id, record.project_id, record.revoked) == (user_id, project_id, False)
    assert record.expires_at - record.issued_at == DEFAULT_TOKEN_TTL == timedelta(hours=24)
    assert await store.validate_token(token) == record
    other, _ = await store.issue_token(user_id, project_id)
    assert other != token


async def test_token_expires(store: IdentityStore) -> None:
    user_id, project_id = await _alice_in_north(store)
    token, record = await store.issue_token(user_id, project_id, ttl=timedelta(minutes=5))
    assert await store.validate_token(token, now=record.expires_at - timedelta(seconds=1)) == record
    assert await store.validate_token(token, now=record.expires_at) is None
    short, _ = await store.issue_token(user_id, project_id, ttl=timedelta(milliseconds=300))
    assert await store.validate_token(short) is not None
    await asyncio.sleep(0.5)
    assert await store.validate_token(short) is None
    assert await store.revoke_token(short) is False
    with pytest.raises(ValueError):
        await store.issue_token(user_id, project_id, ttl=timedelta(0))


async def test_token_revoked(store: IdentityStore) -> None:
    user_id, project_id = await _alice_in_north(store)
    token, _ = await store.issue_token(user_id, project_id)
    kept, _ = await store.issue_token(user_id, project_id)
    assert await store.revoke_token(token) is True
    assert await store.validate_token(token) is None
    assert await store.revoke_token(token) is True
    assert await store.validate_token(kept) is not None


async def test_token_unknown_or_of_disabled_user(store: IdentityStore) -> None:
    user_id, project_id = await _alice_in_north(store)
    assert await store.validate_token("not-a-token") is None
    assert await store.validate_token("") is None
    assert await store.revoke_token("not-a-token") is False
    token, _ = await store.issue_token(user_id, project_id)
    await store.set_user_enabled(user_id, False)
    assert await store.validate_token(token) is None


async def test_token_scope_must_be_in_users_domain(store: IdentityStore) -> None:
    user_id, project_id = await _alice_in_north(store)
    beta = await store.create_domain("beta")
    foreign = await store.create_project(beta.id, "cn-north-4")
    with pytest.raises(IdentityNotFound):
        await store.issue_token(user_id, foreign.id)
    with pytest.raises(IdentityNotFound):
        await store.issue_token("0" * 32, project_id)
    with pytest.raises(IdentityNotFound):
        await store.issue_token(user_id, "0" * 32)


async def test_two_stores_see_each_others_writes(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    user_id, project_id = await _alice_in_north(first)
    assert (await second.find_domain("acme")) is not None
    assert (await second.authenticate("acme", "alice", PASSWORD)).id == user_id
    key, secret = await second.create_access_key(user_id)
    assert await first.secret_for(key.ak) == secret
    token, record = await first.issue_token(user_id, project_id)
    assert await second.validate_token(token) == record
    assert await second.revoke_token(token) is True
    assert await first.validate_token(token) is None


async def test_concurrent_writers_do_not_lose_or_clash(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    both = (first, second)
    await asyncio.gather(*(s.create_domain(f"d{i}-{n}") for i in range(20) for n, s in enumerate(both)))
    assert len(await first.list_domains()) == 40
    results = await asyncio.gather(first.create_domain("same"), second.create_domain("same"),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Domain", "IdentityConflict"]
