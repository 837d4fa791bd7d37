"""The identity store's contract: accounts (domains), users, projects, AK/SK and tokens.

Two backends implement it: `SqliteIdentityStore` (one file, the embedded default) and
`RedisIdentityStore` (several gateway replicas sharing one Redis).

    IdentityError
     ├── IdentityConflict    a name already taken within its scope
     ├── IdentityNotFound    an id that must exist does not
     └── MasterKeyMismatch   a secret key sealed under another master key
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from service.identity.models import AccessKey, Domain, Project, TokenRecord, User

DEFAULT_TOKEN_TTL = timedelta(hours=24)


class IdentityError(Exception): ...


class IdentityConflict(IdentityError): ...


class IdentityNotFound(IdentityError): ...


class MasterKeyMismatch(IdentityError): ...


class IdentityStore(Protocol):
    """Lookups answer None for unknown ids and names; mutations of unknown ids raise
    `IdentityNotFound`. Every datetime is timezone-aware UTC."""

    async def create_domain(self, name: str) -> Domain: ...
    async def get_domain(self, domain_id: str) -> Domain | None: ...
    async def find_domain(self, name: str) -> Domain | None: ...
    async def list_domains(self) -> list[Domain]: ...

    async def create_user(self, domain_id: str, name: str, password: str) -> User: ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def find_user(self, domain_id: str, name: str) -> User | None: ...
    async def list_users(self, domain_id: str) -> list[User]: ...
    async def set_user_enabled(self, user_id: str, enabled: bool) -> None: ...

    async def authenticate(self, domain_name: str, user_name: str, password: str) -> User | None:
        """The enabled user these credentials name, else None; as slow for unknown names."""

    async def create_project(self, domain_id: str, name: str) -> Project: ...
    async def get_project(self, project_id: str) -> Project | None: ...
    async def find_project(self, domain_id: str, name: str) -> Project | None: ...
    async def list_projects(self, domain_id: str) -> list[Project]: ...
    async def set_project_rate_limit(
        self, project_id: str, rate_per_second: float | None, burst: int | None
    ) -> Project: ...

    async def create_access_key(self, user_id: str, description: str = "") -> tuple[AccessKey, str]:
        """The new key and its secret: the only time the secret leaves the store unasked."""

    async def get_access_key(self, ak: str) -> AccessKey | None: ...

    async def secret_for(self, ak: str) -> str | None:
        """The decrypted SK of an enabled key of an enabled user, for checking a signature."""

    async def list_access_keys(self, user_id: str) -> list[AccessKey]: ...
    async def set_access_key_enabled(self, ak: str, enabled: bool) -> None: ...
    async def delete_access_key(self, ak: str) -> bool: ...

    async def issue_token(
        self, user_id: str, project_id: str, ttl: timedelta = DEFAULT_TOKEN_TTL
    ) -> tuple[str, TokenRecord]:
        """A new opaque token scoped to a project of the user's own domain; only its hash is kept."""

    async def validate_token(self, token: str, now: datetime | None = None) -> TokenRecord | None:
        """The record of a known, unexpired, unrevoked token of an enabled user, else None."""

    async def revoke_token(self, token: str) -> bool:
        """True if the token was known and unexpired (revoking twice is harmless)."""

    async def close(self) -> None: ...


def require_name(kind: str, name: str) -> str:
    if not name or name != name.strip() or len(name) > 255:
        raise ValueError(f"a {kind} name must be 1-255 characters without surrounding spaces")
    return name


def check_rate_limit(rate_per_second: float | None, burst: int | None) -> None:
    if rate_per_second is not None and not rate_per_second > 0:
        raise ValueError("rate_per_second must be positive (or None for the default)")
    if burst is not None and burst < 1:
        raise ValueError("burst must be at least 1 (or None for the default)")


def check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise ValueError("a token's ttl must be positive")
