"""`imagetag admin`, run in this process as a user would run it, on the embedded store."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.backends import build_backends
from service.cli import main
from service.settings import Settings


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGETAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("IMAGETAG_REDIS_URL", raising=False)
    monkeypatch.delenv("IMAGETAG_MASTER_KEY", raising=False)
    return tmp_path / "data"


def admin(capsys, *args: str) -> list[list[str]]:
    """The command's rows (tab-separated cells); fails unless it succeeded."""
    assert main(["admin", *args]) == 0, capsys.readouterr().err
    return [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def refused(capsys, *args: str) -> str:
    assert main(["admin", *args]) == 1
    return capsys.readouterr().err


def in_store(data_dir, use):
    async def run():
        backends = build_backends(Settings(data_dir=data_dir, redis_url=None))
        try:
            return await use(backends.store)
        finally:
            await backends.close()

    return asyncio.run(run())


def test_an_account_its_user_project_and_keys_are_managed_by_name(data_dir, capsys):
    [[domain_id, name]] = admin(capsys, "accounts", "create", "acme")
    assert name == "acme" and admin(capsys, "accounts", "list") == [[domain_id, "acme"]]
    [[_, user]] = admin(capsys, "users", "create", "alice", "--domain", "acme", "--password", "s3cret-enough")
    assert admin(capsys, "users", "list", "--domain", "acme")[0][1:] == [user, "enabled"]

    [[project_id, region]] = admin(capsys, "projects", "create", "cn-north-4", "--domain", "acme")
    assert admin(capsys, "projects", "list", "--domain", "acme") == [
        [project_id, region, "default (20/s, burst 40)"]]
    assert admin(capsys, "projects", "set-rate-limit", project_id, "--rate", "5")[0][2] == "5/s, burst 40"
    assert admin(capsys, "projects", "set-rate-limit", project_id)[0][2] == "default (20/s, burst 40)"

    lines = admin(capsys, "keys", "create", "--domain", "acme", "--user", "alice", "--description", "ci")
    ak, sk = lines[0][0].removeprefix("AK: "), lines[1][0].removeprefix("SK: ")
    assert in_store(data_dir, lambda store: store.secret_for(ak)) == sk
    [[listed, state, _, description]] = admin(capsys, "keys", "list", "--domain", "acme", "--user", "alice")
    assert (listed, state, description) == (ak, "enabled", "ci")
    assert admin(capsys, "keys", "disable", ak) == [[ak, "disabled"]]
    assert in_store(data_dir, lambda store: store.secret_for(ak)) is None
    assert admin(capsys, "keys", "enable", ak) == [[ak, "enabled"]]
    assert admin(capsys, "keys", "delete", ak) == [[ak, "deleted"]]
    assert f"no access key {ak}" in refused(capsys, "keys", "delete", ak)


def test_a_user_created_without_a_password_gets_one_shown_once(data_dir, capsys):
    admin(capsys, "accounts", "create", "acme")
    lines = admin(capsys, "users", "create", "bob", "--domain", "acme")  # stdin is no terminal here
    password = lines[-1][0].removeprefix("password (shown once): ")
    assert len(password) >= 20
    assert in_store(data_dir, lambda store: store.authenticate("acme", "bob", password)) is not None


def test_unknown_names_are_one_line_errors(data_dir, capsys):
    assert refused(capsys, "users", "list", "--domain", "nope") == "imagetag admin: no account named 'nope'\n"
    admin(capsys, "accounts", "create", "acme")
    assert "no user 'carol' in account 'acme'" in refused(capsys, "keys", "list", "--domain", "acme", "--user", "carol")
    assert "no such valid token" in refused(capsys, "tokens", "revoke", "not-a-token")


def test_a_revoked_token_stops_validating(data_dir, capsys):
    credentials = json.loads(admin(capsys, "dev-credentials", "--json")[0][0])

    async def issue(store):
        user = await store.authenticate(credentials["domain"], credentials["user"], credentials["password"])
        return (await store.issue_token(user.id, credentials["project_id"]))[0]

    token = in_store(data_dir, issue)
    assert admin(capsys, "tokens", "revoke", token) == [["revoked"]]
    assert in_store(data_dir, lambda store: store.validate_token(token)) is None


def test_dev_credentials_are_complete_and_reused(data_dir, capsys):
    credentials = json.loads(admin(capsys, "dev-credentials", "--json")[0][0])
    assert set(credentials) == {"domain", "user", "password", "project_id", "project_name", "ak", "sk"}
    assert json.loads(admin(capsys, "dev-credentials", "--json")[0][0]) == credentials
    assert oct((data_dir / "dev-credentials.json").stat().st_mode & 0o777) == "0o600"
    assert dict(admin(capsys, "dev-credentials")) == credentials


def test_stale_dev_credentials_are_not_silently_replaced(data_dir, capsys):
    saved = data_dir / "dev-credentials.json"
    admin(capsys, "dev-credentials", "--json")
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "password": "no longer it"}))
    assert "exists but" in refused(capsys, "dev-credentials")
