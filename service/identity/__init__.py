"""Accounts (domains), users, projects, AK/SK credentials and IAM tokens; no web framework here."""

from service.identity.models import AccessKey, Domain, Project, TokenRecord, User
from service.identity.redis import RedisIdentityStore
from service.identity.sqlite import SqliteIdentityStore
from service.identity.store import (
    DEFAULT_TOKEN_TTL,
    IdentityConflict,
    IdentityError,
    IdentityNotFound,
    IdentityStore,
    MasterKeyMismatch,
)

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "AccessKey",
    "Domain",
    "IdentityConflict",
    "IdentityError",
    "IdentityNotFound",
    "IdentityStore",
    "MasterKeyMismatch",
    "Project",
    "RedisIdentityStore",
    "SqliteIdentityStore",
    "TokenRecord",
    "User",
]
