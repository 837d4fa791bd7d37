"""The embedded identity store: one SQLite file in WAL mode, shareable by several processes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import service.identity.crypto as crypto
from service.identity.models import AccessKey, Domain, Project, TokenRecord, User
from service.identity.service import IdentityService
from service.identity.store import IdentityConflict, IdentityNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, domain_id TEXT NOT NULL REFERENCES domains(id), name TEXT NOT NULL,
    password_hash TEXT NOT NULL, enabled INTEGER NOT NULL, created_at REAL NOT NULL,
    UNIQUE (domain_id, name));
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY, domain_id TEXT NOT NULL REFERENCES domains(id), name TEXT NOT NULL,
    rate_per_second REAL, burst INTEGER, created_at REAL NOT NULL, UNIQUE (domain_id, name));
CREATE TABLE IF NOT EXISTS access_keys (
    ak TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id), secret_sealed TEXT NOT NULL,
    enabled INTEGER NOT NULL, description TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS access_keys_by_user ON access_keys (user_id);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id),
    domain_id TEXT NOT NULL, project_id TEXT NOT NULL REFERENCES projects(id),
    issued_at REAL NOT NULL, expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens (expires_at);
"""
T = TypeVar("T")
_KEY_COLUMNS = "k.ak, k.user_id, u.domain_id, k.enabled, k.created_at, k.description"
_KEY_JOIN = "access_keys k JOIN users u ON u.id = k.user_id"


class SqliteRecords:
    """Implements `IdentityRecords`. Opening creates the schema; calls run in a worker thread
    over one connection, serialised by a lock (sqlite3 connections are not thread-safe)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self._lock = threading.Lock()
        # Autocommit: every statement is its own transaction; other processes wait up to
        # busy_timeout_s for the write lock instead of failing at once.
        self._db = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await asyncio.to_thread(self._locked, lambda: self._db.execute(sql, params).fetchall())

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _write(self, sql: str, params: Sequence[Any], what: str) -> bool:
        try:
            return bool(await asyncio.to_thread(self._locked, lambda: self._db.execute(sql, params).rowcount))
        except sqlite3.IntegrityError as error:
            if error.sqlite_errorname == "SQLITE_CONSTRAINT_FOREIGNKEY":
                raise IdentityNotFound(f"cannot create {what}: its owner does not exist") from None
            raise IdentityConflict(f"{what} already exists") from None

    def _locked(self, work: Any) -> Any:
        with self._lock:
            return work()

    async def insert_domain(self, domain: Domain) -> None:
        await self._write("INSERT INTO domains VALUES (?, ?, ?)",
                          (domain.id, domain.name, domain.created_at.timestamp()), f"domain {domain.name!r}")

    async def get_domain(self, domain_id: str) -> Domain | None:
        return _maybe(_domain, await self._row("SELECT * FROM domains WHERE id = ?", (domain_id,)))

    async def find_domain(self, name: str) -> Domain | None:
        return _maybe(_domain, await self._row("SELECT * FROM domains WHERE name = ?", (name,)))

    async def list_domains(self) -> list[Domain]:
        return [_domain(r) for r in await self._rows("SELECT * FROM domains ORDER BY name")]

    async def insert_user(self, user: User, password_hash: str) -> None:
        await self._write(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)",
            (user.id, user.domain_id, user.name, password_hash, int(user.enabled), user.created_at.timestamp()),
            f"user {user.name!r}",
        )

    async def get_user(self, user_id: str) -> User | None:
        return _maybe(_user, await self._row("SELECT * FROM users WHERE id = ?", (user_id,)))

    async def find_user(self, domain_id: str, name: str) -> User | None:
        return _maybe(_user, await self._row(
            "SELECT * FROM users WHERE domain_id = ? AND name = ?", (domain_id, name)))

    async def find_user_with_password(self, domain_name: str, user_name: str) -> tuple[User, str] | None:
        row = await self._row(
            "SELECT u.* FROM users u JOIN domains d ON d.id = u.domain_id"
            " WHERE d.name = ? AND u.name = ?", (domain_name, user_name))
        return None if row is None else (_user(row), row["password_hash"])

    async def list_users(self, domain_id: str) -> list[User]:
        rows = await self._rows("SELECT * FROM users WHERE domain_id = ? ORDER BY name", (domain_id,))
        return [_user(r) for r in rows]

    async def set_user_enabled(self, user_id: str, enabled: bool) -> bool:
        return await self._write("UPDATE users SET enabled = ? WHERE id = ?", (int(enabled), user_id), "user")

    async def insert_project(self, project: Project) -> None:
        await self._write("INSERT INTO projects VALUES (?, ?, ?, ?, ?, ?)",
                          (project.id, project.domain_id, project.name, project.rate_per_second,
                           project.burst, project.created_at.timestamp()),
                          f"project {project.name!r}")

    async def get_project(self, project_id: str) -> Project | None:
        return _maybe(_project, await self._row("SELECT * FROM projects WHERE id = ?", (project_id,)))

    async def find_project(self, domain_id: str, name: str) -> Project | None:
        return _maybe(_project, await self._row(
            "SELECT * FROM projects WHERE domain_id = ? AND name = ?", (domain_id, name)))

    async def list_projects(self, domain_id: str) -> list[Project]:
        rows = await self._rows("SELECT * FROM projects WHERE domain_id = ? ORDER BY name", (domain_id,))
        return [_project(r) for r in rows]

    async def set_project_rate_limit(self, project_id: str, rate_per_second: float | None, burst: int | None) -> bool:
        return await self._write("UPDATE projects SET rate_per_second = ?, burst = ? WHERE id = ?",
                                 (rate_per_second, burst, project_id), "project")

    async def insert_access_key(self, key: AccessKey, sealed_secret: str) -> None:
        await self._write(
            "INSERT INTO access_keys VALUES (?, ?, ?, ?, ?, ?)",
            (key.ak, key.user_id, sealed_secret, int(key.enabled), key.description, key.created_at.timestamp()),
            "access key",
        )

    async def get_access_key(self, ak: str) -> AccessKey | None:
        return _maybe(_key, await self._row(f"SELECT {_KEY_COLUMNS} FROM {_KEY_JOIN} WHERE k.ak = ?", (ak,)))

    async def find_access_key_with_secret(self, ak: str) -> tuple[AccessKey, str] | None:
        row = await self._row(f"SELECT {_KEY_COLUMNS}, k.secret_sealed FROM {_KEY_JOIN} WHERE k.ak = ?", (ak,))
        return None if row is None else (_key(row), row["secret_sealed"])

    async def list_access_keys(self, user_id: str) -> list[AccessKey]:
        rows = await self._rows(
            f"SELECT {_KEY_COLUMNS} FROM {_KEY_JOIN} WHERE k.user_id = ? ORDER BY k.created_at", (user_id,))
        return [_key(r) for r in rows]

    async def set_access_key_enabled(self, ak: str, enabled: bool) -> bool:
        return await self._write("UPDATE access_keys SET enabled = ? WHERE ak = ?", (int(enabled), ak), "access key")

    async def delete_access_key(self, ak: str) -> bool:
        return await self._write("DELETE FROM access_keys WHERE ak = ?", (ak,), "access key")

    async def insert_token(self, record: TokenRecord) -> None:
        # Expired rows are dead weight: sweep them whenever a token is issued.
        await self._write("DELETE FROM tokens WHERE expires_at <= ?", (time.time(),), "token")
        await self._write(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.user_id, record.domain_id, record.project_id, record.issued_at.timestamp(),
             record.expires_at.timestamp(), int(record.revoked)),
            "token",
        )

    async def get_token(self, digest: str) -> TokenRecord | None:
        row = await self._row("SELECT * FROM tokens WHERE digest = ?", (digest,))
        if row is None:
            return None
        return TokenRecord(row["digest"], row["user_id"], row["domain_id"], row["project_id"],
                           crypto.from_epoch(row["issued_at"]), crypto.from_epoch(row["expires_at"]),
                           bool(row["revoked"]))

    async def revoke_token(self, digest: str) -> bool:
        return await self._write("UPDATE tokens SET revoked = 1 WHERE digest = ?", (digest,), "token")

    async def close(self) -> None:
        await asyncio.to_thread(self._locked, self._db.close)


class SqliteIdentityStore(IdentityService):
    """The embedded identity store: the rules of `IdentityService` over one SQLite file."""

    def __init__(self, path: str | Path, master_key: str, *, busy_timeout_s: float = 5.0) -> None:
        super().__init__(SqliteRecords(path, busy_timeout_s=busy_timeout_s), master_key)


def _maybe(convert: Callable[[sqlite3.Row], T], row: sqlite3.Row | None) -> T | None:
    return None if row is None else convert(row)


def _domain(row: sqlite3.Row) -> Domain:
    return Domain(row["id"], row["name"], crypto.from_epoch(row["created_at"]))


def _user(row: sqlite3.Row) -> User:
    return User(row["id"], row["domain_id"], row["name"], bool(row["enabled"]),
                crypto.from_epoch(row["created_at"]))


def _project(row: sqlite3.Row) -> Project:
    return Project(row["id"], row["domain_id"], row["name"], crypto.from_epoch(row["created_at"]),
                   row["rate_per_second"], row["burst"])


def _key(row: sqlite3.Row) -> AccessKey:
    return AccessKey(row["ak"], row["user_id"], row["domain_id"], bool(row["enabled"]),
                     crypto.from_epoch(row["created_at"]), row["description"])
