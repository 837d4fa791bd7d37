"""The shared identity records: hashes in one Redis, for several gateway replicas.

Keys, under `prefix` (default `imagetag:iam:`):

    domains                    hash  name -> domain id (uniqueness and listing)
    domain:{id}                hash  id, name, created_at
    domain:{id}:users          hash  name -> user id
    domain:{id}:projects       hash  name -> project id
    user:{id}                  hash  id, domain_id, name, password_hash, enabled, created_at
    user:{id}:keys             set   the user's AKs
    project:{id}               hash  id, domain_id, name, rate_per_second, burst, created_at
    ak:{AK}                    hash  ak, user_id, domain_id, secret_sealed, enabled, description, created_at
    token:{sha256 of token}    hash  user_id, domain_id, project_id, issued_at, expires_at, revoked;
                                     expires with the token (PEXPIREAT)

Times are epoch seconds; an unset rate limit is "".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis

from inference.tasks import as_text
import service.identity.crypto as crypto
from service.identity.models import AccessKey, Domain, Project, TokenRecord, User
from service.identity.service import IdentityService
from service.identity.store import IdentityConflict

# Claim the name in the index and write the record in one step, so a crash cannot leave a
# name claimed by a record that was never written.
_CREATE_UNIQUE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
return 1
"""
# A bare HSET on a missing (or just expired) key would create a partial record without a TTL.
_UPDATE_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
Record = dict[str, str]
T = TypeVar("T")


class RedisRecords:
    """Implements `IdentityRecords`. The client is the caller's: `close()` leaves it open."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "imagetag:iam:") -> None:
        self._redis = client
        self._p = prefix
        self._create_unique = client.register_script(_CREATE_UNIQUE)
        self._update_existing = client.register_script(_UPDATE_EXISTING)

    async def _record(self, key: str) -> Record | None:
        return _decode(await self._redis.hgetall(self._p + key)) or None

    async def _records(self, index_key: str, kind: str) -> list[Record]:
        ids = sorted(_decode(await self._redis.hgetall(self._p + index_key)).items())
        pipe = self._redis.pipeline(transaction=False)
        for _, record_id in ids:
            pipe.hgetall(f"{self._p}{kind}:{record_id}")
        return [record for raw in await pipe.execute() if (record := _decode(raw))]

    async def _create(self, index_key: str, name: str, key: str, record: Record, what: str) -> None:
        fields = [part for pair in record.items() for part in pair]
        keys = [self._p + index_key, self._p + key]
        if not await self._create_unique(keys=keys, args=[name, record["id"], *fields]):
            raise IdentityConflict(f"{what} already exists")

    async def _create_in_domain(self, kind: str, record: Record) -> None:
        """A user or a project: its name is unique within its domain."""
        index_key, name = f"domain:{record['domain_id']}:{kind}s", record["name"]
        await self._create(index_key, name, f"{kind}:{record['id']}", record, f"{kind} {name!r}")

    async def _update(self, key: str, fields: Record) -> bool:
        args = [part for pair in fields.items() for part in pair]
        return bool(await self._update_existing(keys=[self._p + key], args=args))

    async def _by_name(self, index_key: str, name: str, kind: str) -> Record | None:
        record_id = await self._redis.hget(self._p + index_key, name)
        return None if record_id is None else await self._record(f"{kind}:{as_text(record_id)}")

    async def insert_domain(self, domain: Domain) -> None:
        record = {"id": domain.id, "name": domain.name, "created_at": _epoch(domain.created_at)}
        await self._create("domains", domain.name, f"domain:{domain.id}", record, f"domain {domain.name!r}")

    async def get_domain(self, domain_id: str) -> Domain | None:
        return _maybe(_domain, await self._record(f"domain:{domain_id}"))

    async def find_domain(self, name: str) -> Domain | None:
        return _maybe(_domain, await self._by_name("domains", name, "domain"))

    async def list_domains(self) -> list[Domain]:
        return [_domain(r) for r in await self._records("domains", "domain")]

    async def insert_user(self, user: User, password_hash: str) -> None:
        record = {"id": user.id, "domain_id": user.domain_id, "name": user.name, "enabled": _flag(user.enabled),
                  "password_hash": password_hash, "created_at": _epoch(user.created_at)}
        await self._create_in_domain("user", record)

    async def get_user(self, user_id: str) -> User | None:
        return _maybe(_user, await self._record(f"user:{user_id}"))

    async def find_user(self, domain_id: str, name: str) -> User | None:
        return _maybe(_user, await self._by_name(f"domain:{domain_id}:users", name, "user"))

    async def find_user_with_password(self, domain_name: str, user_name: str) -> tuple[User, str] | None:
        domain_id = await self._redis.hget(self._p + "domains", domain_name)
        if domain_id is None:
            return None
        record = await self._by_name(f"domain:{as_text(domain_id)}:users", user_name, "user")
        return None if record is None else (_user(record), record["password_hash"])

    async def list_users(self, domain_id: str) -> list[User]:
        return [_user(r) for r in await self._records(f"domain:{domain_id}:users", "user")]

    async def set_user_enabled(self, user_id: str, enabled: bool) -> bool:
        return await self._update(f"user:{user_id}", {"enabled": _flag(enabled)})

    async def insert_project(self, project: Project) -> None:
        record = {"id": project.id, "domain_id": project.domain_id, "name": project.name,
                  **_rate_limit_fields(project.rate_per_second, project.burst),
                  "created_at": _epoch(project.created_at)}
        await self._create_in_domain("project", record)

    async def find_project(self, domain_id: str, name: str) -> Project | None:
        return _maybe(_project, await self._by_name(f"domain:{domain_id}:projects", name, "project"))

    async def get_project(self, project_id: str) -> Project | None:
        return _maybe(_project, await self._record(f"project:{project_id}"))

    async def list_projects(self, domain_id: str) -> list[Project]:
        return [_project(r) for r in await self._records(f"domain:{domain_id}:projects", "project")]

    async def set_project_rate_limit(self, project_id: str, rate_per_second: float | None, burst: int | None) -> bool:
        return await self._update(f"project:{project_id}", _rate_limit_fields(rate_per_second, burst))

    async def insert_access_key(self, key: AccessKey, sealed_secret: str) -> None:
        record = {"ak": key.ak, "user_id": key.user_id, "domain_id": key.domain_id, "enabled": _flag(key.enabled),
                  "secret_sealed": sealed_secret, "description": key.description,
                  "created_at": _epoch(key.created_at)}
        # 36**20 possible AKs: a collision is not worth a uniqueness check.
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(f"{self._p}ak:{key.ak}", mapping=record)
        pipe.sadd(f"{self._p}user:{key.user_id}:keys", key.ak)
        await pipe.execute()

    async def get_access_key(self, ak: str) -> AccessKey | None:
        return _maybe(_key, await self._record(f"ak:{ak}"))

    async def find_access_key_with_secret(self, ak: str) -> tuple[AccessKey, str] | None:
        record = await self._record(f"ak:{ak}")
        return None if record is None else (_key(record), record["secret_sealed"])

    async def list_access_keys(self, user_id: str) -> list[AccessKey]:
        pipe = self._redis.pipeline(transaction=False)
        for ak in await self._redis.smembers(f"{self._p}user:{user_id}:keys"):
            pipe.hgetall(f"{self._p}ak:{as_text(ak)}")
        keys = [_key(record) for raw in await pipe.execute() if (record := _decode(raw))]
        return sorted(keys, key=lambda k: k.created_at)

    async def set_access_key_enabled(self, ak: str, enabled: bool) -> bool:
        return await self._update(f"ak:{ak}", {"enabled": _flag(enabled)})

    async def delete_access_key(self, ak: str) -> bool:
        user_id = await self._redis.hget(f"{self._p}ak:{ak}", "user_id")
        if user_id is None:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(f"{self._p}ak:{ak}")
        pipe.srem(f"{self._p}user:{as_text(user_id)}:keys", ak)
        deleted, _ = await pipe.execute()
        return bool(deleted)

    async def insert_token(self, record: TokenRecord) -> None:
        key = f"{self._p}token:{record.id}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"user_id": record.user_id, "domain_id": record.domain_id,
                                "project_id": record.project_id, "issued_at": _epoch(record.issued_at),
                                "expires_at": _epoch(record.expires_at), "revoked": _flag(record.revoked)})
        pipe.pexpireat(key, record.expires_at)
        await pipe.execute()

    async def get_token(self, digest: str) -> TokenRecord | None:
        r = await self._record(f"token:{digest}")
        if r is None:
            return None
        return TokenRecord(digest, r["user_id"], r["domain_id"], r["project_id"],
                           crypto.from_epoch(float(r["issued_at"])), crypto.from_epoch(float(r["expires_at"])),
                           r["revoked"] == "1")

    async def revoke_token(self, digest: str) -> bool:
        return await self._update(f"token:{digest}", {"revoked": "1"})

    async def close(self) -> None:
        """Nothing to release: the client may be shared with the rest of the gateway."""


class RedisIdentityStore(IdentityService):
    """The shared identity store: the rules of `IdentityService` over hashes in one Redis."""

    def __init__(self, client: aioredis.Redis, master_key: str, *, prefix: str = "imagetag:iam:") -> None:
        super().__init__(RedisRecords(client, prefix=prefix), master_key)


def _decode(raw: Mapping[Any, Any]) -> Record:
    # Works whether or not the caller's client was built with decode_responses=True.
    return {as_text(k): as_text(v) for k, v in raw.items()}


def _epoch(moment: datetime) -> str:
    return repr(moment.timestamp())


def _rate_limit_fields(rate_per_second: float | None, burst: int | None) -> Record:
    return {"rate_per_second": "" if rate_per_second is None else repr(float(rate_per_second)),
            "burst": "" if burst is None else str(int(burst))}


def _flag(enabled: bool) -> str:
    return "1" if enabled else "0"


def _maybe(convert: Callable[[Record], T], record: Record | None) -> T | None:
    return None if record is None else convert(record)


def _domain(r: Record) -> Domain:
    return Domain(r["id"], r["name"], crypto.from_epoch(float(r["created_at"])))


def _user(r: Record) -> User:
    return User(r["id"], r["domain_id"], r["name"], r["enabled"] == "1",
                crypto.from_epoch(float(r["created_at"])))


def _project(r: Record) -> Project:
    return Project(r["id"], r["domain_id"], r["name"], crypto.from_epoch(float(r["created_at"])),
                   float(r["rate_per_second"]) if r["rate_per_second"] else None,
                   int(r["burst"]) if r["burst"] else None)


def _key(r: Record) -> AccessKey:
    return AccessKey(r["ak"], r["user_id"], r["domain_id"], r["enabled"] == "1",
                     crypto.from_epoch(float(r["created_at"])), r["description"])
