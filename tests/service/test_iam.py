"""The IAM use cases on a real (SQLite) store and real login limits: password login, revocation,
project discovery. The wire and the clients' own flows run end to end in `routes/test_iam.py`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from service.auth.authenticator import Principal
from service.errors import InvalidCredentials, ProjectForbidden, RateLimited
from service.gate import Gate, Limits
from service.iam import IamService, iam_time
from service.identity import Domain, Project, SqliteIdentityStore
from service.protocol.iam import TokenRequest
from service.ratelimit import LocalRateLimiter

BASE_URL = "https://tagging.example.com"


@dataclass
class Accounts:
    iam: IamService
    store: SqliteIdentityStore
    acme: Domain
    north: Project
    east: Project
    other: Project


def login_request(user: str = "alice", password: str = "alice-password", *, domain: dict | None = None,
                  project: dict | None = None) -> TokenRequest:
    return TokenRequest.parse({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "domain": domain or {"name": "acme"}, "name": user, "password": password}}},
        "scope": {"project": project or {"name": "cn-north-4"}}}})


async def login(iam: IamService, request: TokenRequest, client_host: str | None = "192.0.2.1", **kwargs):
    return await iam.login(request, client_host=client_host, with_catalog=kwargs.get("with_catalog", True),
                           base_url=BASE_URL)


def run(tmp_path, test, login_per_minute: float = 100):
    async def main():
        store = SqliteIdentityStore(tmp_path / "identity.sqlite3", "m" * 32)
        acme, other = await store.create_domain("acme"), await store.create_domain("other")
        await store.create_user(acme.id, "alice", "alice-password")
        await store.create_user(other.id, "bob", "bob-password")
        north = await store.create_project(acme.id, "cn-north-4")
        east = await store.create_project(acme.id, "cn-east-3")
        elsewhere = await store.create_project(other.id, "cn-north-4")
        gate = Gate(LocalRateLimiter(), Limits(rate_per_s=10, burst=10, max_concurrent_per_project=1,
                                               login_per_minute=login_per_minute, login_failures_per_hour=100,
                                               max_concurrent_downloads_per_project=1))
        try:
            iam = IamService(store, gate, timedelta(hours=2))
            return await test(Accounts(iam, store, acme, north, east, elsewhere))
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_login_gets_a_token_for_the_project_named_or_identified(tmp_path):
    async def test(a: Accounts) -> None:
        token, response = await login(a.iam, login_request())
        record = await a.store.validate_token(token)
        assert record.project_id == a.north.id == response.token.project.id
        assert response.token.user.name == "alice" and response.token.project.domain.id == a.acme.id
        assert record.expires_at - record.issued_at == timedelta(hours=2)
        assert response.token.expires_at == iam_time(record.expires_at)
        by_ids = await login(a.iam, login_request(domain={"id": a.acme.id}, project={"id": a.east.id}))
        assert by_ids[1].token.project.name == "cn-east-3"

    run(tmp_path, test)


def test_the_catalog_points_clients_back_here_unless_refused(tmp_path):
    async def test(a: Accounts) -> None:
        _, response = await login(a.iam, login_request(project={"name": "cn-east-3"}))
        (entry,) = response.token.catalog
        (endpoint,) = entry.endpoints
        assert (entry.type, endpoint.url, endpoint.region) == ("image", BASE_URL, "cn-east-3")
        _, again = await login(a.iam, login_request())
        assert again.token.catalog[0].endpoints[0].id == endpoint.id  # stable per base URL
        assert (await login(a.iam, login_request(), with_catalog=False))[1].token.catalog is None

    run(tmp_path, test)


@pytest.mark.parametrize("request_args", [
    {"password": "wrong"},
    {"user": "mallory"},
    {"domain": {"name": "nobody"}},
    {"domain": {"id": "f" * 32}},
], ids=["wrong password", "unknown user", "unknown account", "unknown account id"])
def test_a_wrong_account_user_or_password_says_only_that(tmp_path, request_args):
    async def test(a: Accounts) -> None:
        with pytest.raises(InvalidCredentials, match="the account, user name or password is wrong"):
            await login(a.iam, login_request(**request_args))

    run(tmp_path, test)


@pytest.mark.parametrize("project", ["another account's", "unknown name", "unknown id"])
def test_a_login_is_for_a_project_of_the_users_own_account(tmp_path, project):
    async def test(a: Accounts) -> None:
        scope = {"another account's": {"id": a.other.id}, "unknown name": {"name": "eu-west-0"},
                 "unknown id": {"id": "f" * 32}}[project]
        with pytest.raises(ProjectForbidden, match="account acme has no project"):
            await login(a.iam, login_request(project=scope))

    run(tmp_path, test)


def test_password_attempts_are_counted_before_the_password_is_checked(tmp_path):
    async def test(a: Accounts) -> None:
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                await login(a.iam, login_request(password="wrong"), client_host=None)
        with pytest.raises(RateLimited):
            await login(a.iam, login_request(), client_host=None)
        unknown = login_request(domain={"name": "nobody"})  # limited alike, so probing them is slow too
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                await login(a.iam, unknown, client_host=None)
        with pytest.raises(RateLimited):
            await login(a.iam, unknown, client_host=None)

    run(tmp_path, test, login_per_minute=2)


def test_a_right_password_from_another_address_is_accepted(tmp_path):
    async def test(a: Accounts) -> None:
        for _ in range(2):
            with pytest.raises(InvalidCredentials):
                await login(a.iam, login_request(password="wrong"), client_host="198.51.100.7")
        with pytest.raises(RateLimited):
            await login(a.iam, login_request(), client_host="198.51.100.7")
        for _ in range(5):  # and right ones are never counted
            await login(a.iam, login_request(), client_host="192.0.2.1")

    run(tmp_path, test, login_per_minute=2)


def test_a_token_is_revoked_only_by_its_own_account(tmp_path):
    async def test(a: Accounts) -> None:
        token, _ = await login(a.iam, login_request())
        bob = await a.store.find_user(a.other.domain_id, "bob")
        outsider = Principal(bob.id, a.other.domain_id, None, None, "token")
        with pytest.raises(InvalidCredentials, match="not a valid token of this account"):
            await a.iam.revoke(outsider, token)
        assert await a.store.validate_token(token) is not None
        record = await a.store.validate_token(token)
        await a.iam.revoke(Principal(record.user_id, a.acme.id, None, None, "token"), token)
        assert await a.store.validate_token(token) is None
        with pytest.raises(InvalidCredentials):
            await a.iam.revoke(Principal(record.user_id, a.acme.id, None, None, "token"), token)

    run(tmp_path, test)


def test_projects_are_the_callers_own_optionally_by_name(tmp_path):
    async def test(a: Accounts) -> None:
        caller = Principal("u" * 32, a.acme.id, None, None, "aksk")
        assert {p.name for p in (await a.iam.projects(caller, None)).projects} == {"cn-north-4", "cn-east-3"}
        (north,) = (await a.iam.projects(caller, "cn-north-4")).projects
        assert (north.id, north.domain_id) == (a.north.id, a.acme.id)
        assert (await a.iam.projects(caller, "eu-west-0")).projects == []

    run(tmp_path, test)


def test_iam_times_have_microseconds_and_a_z():
    assert iam_time(datetime(2024, 1, 2, 3, 4, 5, 60, tzinfo=UTC)) == "2024-01-02T03:04:05.000060Z"
