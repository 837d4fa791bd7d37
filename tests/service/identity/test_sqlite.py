"""What the SQLite record store does of its own (the identity rules over it are in `test_service.py`)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

from service.identity import SqliteIdentityStore


def test_sqlite_uses_wal_and_sweeps_expired_tokens(tmp_path) -> None:
    path = tmp_path / "identity.sqlite3"

    async def main() -> None:
        store = SqliteIdentityStore(path, "test-master-key-not-for-production")
        try:
            acme = await store.create_domain("acme")
            alice = await store.create_user(acme.id, "alice", "correct horse battery staple")
            project_id = (await store.create_project(acme.id, "cn-north-4")).id
            await store.issue_token(alice.id, project_id, ttl=timedelta(milliseconds=100))
            await asyncio.sleep(0.2)
            await store.issue_token(alice.id, project_id)
        finally:
            await store.close()

    asyncio.run(main())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT count(*) FROM tokens").fetchone() == (1,)
    db.close()
