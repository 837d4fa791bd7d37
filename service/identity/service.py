"""The identity rules, once, over either record store: names, password hashing, secret sealing,
token hashing and lifetimes, and which records may refer to which."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import service.identity.crypto as crypto
from service.identity.models import AccessKey, Domain, Project, TokenRecord, User
from service.identity.store import DEFAULT_TOKEN_TTL, IdentityNotFound, IdentityRecords


class IdentityService:
    """Implements `IdentityStore` on an `IdentityRecords` backend (SQLite or Redis), which only
    stores and finds records: every decision is taken here."""

    def __init__(self, records: IdentityRecords, master_key: str) -> None:
        self._records = records
        self._box = crypto.SecretBox(master_key)

    async def create_domain(self, name: str) -> Domain:
        domain = Domain(crypto.new_id(), require_name("domain", name), crypto.utcnow())
        await self._records.insert_domain(domain)
        return domain

    async def get_domain(self, domain_id: str) -> Domain | None:
        return await self._records.get_domain(domain_id)

    async def find_domain(self, name: str) -> Domain | None:
        return await self._records.find_domain(name)

    async def list_domains(self) -> list[Domain]:
        return await self._records.list_domains()

    async def create_user(self, domain_id: str, name: str, password: str) -> User:
        user = User(crypto.new_id(), domain_id, require_name("user", name), True, crypto.utcnow())
        await self._require_domain(domain_id)
        password_hash = await asyncio.to_thread(crypto.hash_password, password)
        await self._records.insert_user(user, password_hash)
        return user

    async def get_user(self, user_id: str) -> User | None:
        return await self._records.get_user(user_id)

    async def find_user(self, domain_id: str, name: str) -> User | None:
        return await self._records.find_user(domain_id, name)

    async def list_users(self, domain_id: str) -> list[User]:
        return await self._records.list_users(domain_id)

    async def set_user_enabled(self, user_id: str, enabled: bool) -> None:
        if not await self._records.set_user_enabled(user_id, enabled):
            raise IdentityNotFound(f"no user {user_id}")

    async def authenticate(self, domain_name: str, user_name: str, password: str) -> User | None:
        found = await self._records.find_user_with_password(domain_name, user_name)
        # Unknown names go through the same slow check, so timing tells nothing.
        matches = await asyncio.to_thread(crypto.verify_password, password, found[1] if found else None)
        return found[0] if found and matches and found[0].enabled else None

    async def create_project(self, domain_id: str, name: str) -> Project:
        project = Project(crypto.new_id(), domain_id, require_name("project", name), crypto.utcnow())
        await self._require_domain(domain_id)
        await self._records.insert_project(project)
        return project

    async def find_project(self, domain_id: str, name: str) -> Project | None:
        return await self._records.find_project(domain_id, name)

    async def get_project(self, project_id: str) -> Project | None:
        return await self._records.get_project(project_id)

    async def list_projects(self, domain_id: str) -> list[Project]:
        return await self._records.list_projects(domain_id)

    async def set_project_rate_limit(
        self, project_id: str, rate_per_second: float | None, burst: int | None
    ) -> Project:
        if rate_per_second is not None and not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive (or None for the default)")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1 (or None for the default)")
        await self._records.set_project_rate_limit(project_id, rate_per_second, burst)
        project = await self._records.get_project(project_id)
        if project is None:
            raise IdentityNotFound(f"no project {project_id}")
        return project

    async def create_access_key(self, user_id: str, description: str = "") -> tuple[AccessKey, str]:
        user = await self._records.get_user(user_id)
        if user is None:
            raise IdentityNotFound(f"no user {user_id}")
        key = AccessKey(crypto.new_access_key(), user_id, user.domain_id, True, crypto.utcnow(), description)
        secret = crypto.new_secret_key()
        await self._records.insert_access_key(key, self._box.encrypt(key.ak, secret))
        return key, secret

    async def get_access_key(self, ak: str) -> AccessKey | None:
        return await self._records.get_access_key(ak)

    async def secret_for(self, ak: str) -> str | None:
        found = await self._records.find_access_key_with_secret(ak)
        if found is None or not found[0].enabled or not await self._user_enabled(found[0].user_id):
            return None
        return self._box.decrypt(ak, found[1])

    async def list_access_keys(self, user_id: str) -> list[AccessKey]:
        return await self._records.list_access_keys(user_id)

    async def set_access_key_enabled(self, ak: str, enabled: bool) -> None:
        if not await self._records.set_access_key_enabled(ak, enabled):
            raise IdentityNotFound(f"no access key {ak}")

    async def delete_access_key(self, ak: str) -> bool:
        return await self._records.delete_access_key(ak)

    async def issue_token(
        self, user_id: str, project_id: str, ttl: timedelta = DEFAULT_TOKEN_TTL
    ) -> tuple[str, TokenRecord]:
        if ttl <= timedelta(0):
            raise ValueError("a token's ttl must be positive")
        user, project = await self._records.get_user(user_id), await self._records.get_project(project_id)
        if user is None or project is None or project.domain_id != user.domain_id:
            raise IdentityNotFound(f"no project {project_id} in the domain of user {user_id}")
        token, issued_at = crypto.new_token(), crypto.utcnow()
        record = TokenRecord(
            crypto.token_digest(token), user_id, user.domain_id, project_id, issued_at, issued_at + ttl
        )
        await self._records.insert_token(record)
        return token, record

    async def validate_token(self, token: str, now: datetime | None = None) -> TokenRecord | None:
        record = await self._records.get_token(crypto.token_digest(token))
        if record is None or record.revoked or record.expires_at <= (now or crypto.utcnow()):
            return None
        return record if await self._user_enabled(record.user_id) else None

    async def revoke_token(self, token: str) -> bool:
        digest = crypto.token_digest(token)
        record = await self._records.get_token(digest)
        if record is None or record.expires_at <= crypto.utcnow():
            return False
        return await self._records.revoke_token(digest)

    async def close(self) -> None:
        await self._records.close()

    async def _require_domain(self, domain_id: str) -> None:
        if await self._records.get_domain(domain_id) is None:
            raise IdentityNotFound(f"no domain {domain_id}")

    async def _user_enabled(self, user_id: str) -> bool:
        user = await self._records.get_user(user_id)
        return user is not None and user.enabled


def require_name(kind: str, name: str) -> str:
    if not name or name != name.strip() or len(name) > 255:
        raise ValueError(f"a {kind} name must be 1-255 characters without surrounding spaces")
    return name
