"""The identity records, as the backends hand them out: no password hashes, no secrets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Domain:
    """An account: the cloud calls it a domain; it owns users and projects."""

    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class User:
    id: str
    domain_id: str
    name: str
    enabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Project:
    """`id` is 32 lowercase hex, like the cloud's; `name` is a region such as cn-north-4."""

    id: str
    domain_id: str
    name: str
    created_at: datetime
    rate_per_second: float | None = None
    """Per-project override of the gateway's rate limit; None means the default applies."""
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class AccessKey:
    """An AK; its SK is shown once at creation and otherwise only decrypted to check a signature."""

    ak: str
    user_id: str
    domain_id: str
    enabled: bool
    created_at: datetime
    description: str = ""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What a token stands for. `id` is the token's SHA-256: safe to log, useless as a credential."""

    id: str
    user_id: str
    domain_id: str
    project_id: str
    issued_at: datetime
    expires_at: datetime
    revoked: bool = False
