"""The shared identity store: hashes in one Redis, for several gateway replicas.

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

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import redis.asyncio as aioredis

from service.identity import crypto
from service.identity.models import AccessKey, Domain, Project, TokenRecord, User
from service.identity.store import (
    DEFAULT_TOKEN_TTL,
    IdentityConflict,
    IdentityNotFound,
    check_rate_limit,
    check_ttl,
    require_name,
)

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


class RedisIdentityStore:
    """Implements `IdentityStore`. The client is the caller's: `close()` leaves it open."""

    def __init__(self, client: aioredis.Redis, master_key: str, *, prefix: str = "imagetag:iam:") -> None:
        self._redis = client
        self._box = crypto.SecretBox(master_key)
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

    async def _update(self, key: str, fields: Record, what: str) -> None:
        args = [part for pair in fields.items() for part in pair]
        if not await self._update_existing(keys=[self._p + key], args=args):
            raise IdentityNotFound(f"no {what}")

    async def _by_name(self, index_key: str, name: str, kind: str) -> Record | None:
        record_id = await self._redis.hget(self._p + index_key, name)
        return None if record_id is None else await self._record(f"{kind}:{_text(record_id)}")

    async def _require(self, key: str) -> None:
        if not await self._redis.exists(self._p + key):
            raise IdentityNotFound(f"no {key.replace(':', ' ')}")

    async def create_domain(self, name: str) -> Domain:
        domain = Domain(crypto.new_id(), require_name("domain", name), crypto.utcnow())
        record = {"id": domain.id, "name": name, "created_at": _epoch(domain.created_at)}
        await self._create("domains", name, f"domain:{domain.id}", record, f"domain {name!r}")
        return domain

    async def get_domain(self, domain_id: str) -> Domain | None:
        return _maybe(_domain, await self._record(f"domain:{domain_id}"))

    async def find_domain(self, name: str) -> Domain | None:
        return _maybe(_domain, await self._by_name("domains", name, "domain"))

    async def list_domains(self) -> list[Domain]:
        return [_domain(r) for r in await self._records("domains", "domain")]

    async def create_user(self, domain_id: str, name: str, password: str) -> User:
        user = User(crypto.new_id(), domain_id, require_name("user", name), True, crypto.utcnow())
        await self._require(f"domain:{domain_id}")
        record = {"id": user.id, "domain_id": domain_id, "name": name, "enabled": "1",
                  "password_hash": await asyncio.to_thread(crypto.hash_password, password),
                  "created_at": _epoch(user.created_at)}
        await self._create(f"domain:{domain_id}:users", name, f"user:{user.id}", record, f"user {name!r}")
        return user

    async def get_user(self, user_id: str) -> User | None:
        return _maybe(_user, await self._record(f"user:{user_id}"))

    async def find_user(self, domain_id: str, name: str) -> User | None:
        return _maybe(_user, await self._by_name(f"domain:{domain_id}:users", name, "user"))

    async def list_users(self, domain_id: str) -> list[User]:
        return [_user(r) for r in await self._records(f"domain:{domain_id}:users", "user")]

    async def set_user_enabled(self, user_id: str, enabled: bool) -> None:
        await self._update(f"user:{user_id}", {"enabled": _flag(enabled)}, f"user {user_id}")

    async def authenticate(self, domain_name: str, user_name: str, password: str) -> User | None:
        domain_id = await self._redis.hget(self._p + "domains", domain_name)
        record = None if domain_id is None else await self._by_name(
            f"domain:{_text(domain_id)}:users", user_name, "user")
        stored = record["password_hash"] if record else None
        if await asyncio.to_thread(crypto.verify_password, password, stored) and record:
            user = _user(record)
            return user if user.enabled else None
        return None

    async def create_project(self, domain_id: str, name: str) -> Project:
        project = Project(crypto.new_id(), domain_id, require_name("project", name), crypto.utcnow())
        await self._require(f"domain:{domain_id}")
        record = {"id": project.id, "domain_id": domain_id, "name": name, "rate_per_second": "",
                  "burst": "", "created_at": _epoch(project.created_at)}
        await self._create(f"domain:{domain_id}:projects", name, f"project:{project.id}", record,
                           f"project {name!r}")
        return project

    async def get_project(self, project_id: str) -> Project | None:
        return _maybe(_project, await self._record(f"project:{project_id}"))

    async def find_project(self, domain_id: str, name: str) -> Project | None:
        return _maybe(_project, await self._by_name(f"domain:{domain_id}:projects", name, "project"))

    async def list_projects(self, domain_id: str) -> list[Project]:
        return [_project(r) for r in await self._records(f"domain:{domain_id}:projects", "project")]

    async def set_project_rate_limit(
        self, project_id: str, rate_per_second: float | None, burst: int | None
    ) -> Project:
        check_rate_limit(rate_per_second, burst)
        fields = {"rate_per_second": "" if rate_per_second is None else repr(float(rate_per_second)),
                  "burst": "" if burst is None else str(int(burst))}
        await self._update(f"project:{project_id}", fields, f"project {project_id}")
        project = await self.get_project(project_id)
        if project is None:
            raise IdentityNotFound(f"no project {project_id}")
        return project

    async def create_access_key(self, user_id: str, description: str = "") -> tuple[AccessKey, str]:
        user = await self.get_user(user_id)
        if user is None:
            raise IdentityNotFound(f"no user {user_id}")
        key = AccessKey(crypto.new_access_key(), user_id, user.domain_id, True, crypto.utcnow(), description)
        secret = crypto.new_secret_key()
        record = {"ak": key.ak, "user_id": user_id, "domain_id": user.domain_id, "enabled": "1",
                  "secret_sealed": self._box.encrypt(key.ak, secret), "description": description,
                  "created_at": _epoch(key.created_at)}
        # 36**20 possible AKs: a collision is not worth a uniqueness check.
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(f"{self._p}ak:{key.ak}", mapping=record)
        pipe.sadd(f"{self._p}user:{user_id}:keys", key.ak)
        await pipe.execute()
        return key, secret

    async def get_access_key(self, ak: str) -> AccessKey | None:
        return _maybe(_key, await self._record(f"ak:{ak}"))

    async def secret_for(self, ak: str) -> str | None:
        record = await self._record(f"ak:{ak}")
        if record is None or record["enabled"] != "1" or not await self._user_enabled(record["user_id"]):
            return None
        return self._box.decrypt(ak, record["secret_sealed"])

    async def list_access_keys(self, user_id: str) -> list[AccessKey]:
        pipe = self._redis.pipeline(transaction=False)
        for ak in await self._redis.smembers(f"{self._p}user:{user_id}:keys"):
            pipe.hgetall(f"{self._p}ak:{_text(ak)}")
        keys = [_key(record) for raw in await pipe.execute() if (record := _decode(raw))]
        return sorted(keys, key=lambda k: k.created_at)

    async def set_access_key_enabled(self, ak: str, enabled: bool) -> None:
        await self._update(f"ak:{ak}", {"enabled": _flag(enabled)}, f"access key {ak}")

    async def delete_access_key(self, ak: str) -> bool:
        user_id = await self._redis.hget(f"{self._p}ak:{ak}", "user_id")
        if user_id is None:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(f"{self._p}ak:{ak}")
        pipe.srem(f"{self._p}user:{_text(user_id)}:keys", ak)
        deleted, _ = await pipe.execute()
        return bool(deleted)

    async def issue_token(
        self, user_id: str, project_id: str, ttl: timedelta = DEFAULT_TOKEN_TTL
    ) -> tuple[str, TokenRecord]:
        check_ttl(ttl)
        user, project = await self.get_user(user_id), await self.get_project(project_id)
        if user is None or project is None or project.domain_id != user.domain_id:
            raise IdentityNotFound(f"no project {project_id} in the domain of user {user_id}")
        token, issued_at = crypto.new_token(), crypto.utcnow()
        record = TokenRecord(crypto.token_digest(token), user_id, user.domain_id, project_id,
                             issued_at, issued_at + ttl)
        key = f"{self._p}token:{record.id}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"user_id": user_id, "domain_id": user.domain_id, "project_id": project_id,
                                "issued_at": _epoch(issued_at), "expires_at": _epoch(record.expires_at),
                                "revoked": "0"})
        pipe.pexpireat(key, record.expires_at)
        await pipe.execute()
        return token, record

    async def validate_token(self, token: str, now: datetime | None = None) -> TokenRecord | None:
        digest = crypto.token_digest(token)
        record = await self._record(f"token:{digest}")
        if record is None or record["revoked"] != "0":
            return None
        expires_at = crypto.from_epoch(float(record["expires_at"]))
        if expires_at <= (now or crypto.utcnow()) or not await self._user_enabled(record["user_id"]):
            return None
        return TokenRecord(digest, record["user_id"], record["domain_id"], record["project_id"],
                           crypto.from_epoch(float(record["issued_at"])), expires_at)

    async def revoke_token(self, token: str) -> bool:
        key = f"token:{crypto.token_digest(token)}"
        try:
            await self._update(key, {"revoked": "1"}, "token")
        except IdentityNotFound:
            return False
        return True

    async def _user_enabled(self, user_id: str) -> bool:
        return _text(await self._redis.hget(f"{self._p}user:{user_id}", "enabled")) == "1"

    async def close(self) -> None:
        """Nothing to release: the client may be shared with the rest of the gateway."""


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: Mapping[Any, Any]) -> Record:
    # Works whether or not the caller's client was built with decode_responses=True.
    return {_text(k): _text(v) for k, v in raw.items()}  # type: ignore[misc]


def _epoch(moment: datetime) -> str:
    return repr(moment.timestamp())


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
