"""Who is calling and for which project, on a real (SQLite) store and requests signed by the SDK.

The refusals every client sees (no credentials, wrong SK, stale date, another account's project)
run end to end in `tests/service/routes/test_iam.py`; here are the rules behind them.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import timedelta

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from service.auth.authenticator import Authenticator, IncomingRequest
from service.errors import InvalidCredentials, MissingCredentials, ProjectForbidden
from service.identity import SqliteIdentityStore

PROXY = "10.0.0.5"
BODY = json.dumps({"image": "aGVsbG8="}).encode()


class Body:
    """A request body as the authenticator gets it: read on demand, the reads counted."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.reads = 0

    async def sha256(self) -> str:
        self.reads += 1
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Account:
    authenticator: Authenticator
    store: SqliteIdentityStore
    user_id: str
    projects: list[str]
    ak: str
    sk: str
    token: str


async def account(tmp_path, *project_names: str) -> Account:
    """One account with a user, its projects and an AK/SK; the token is scoped to the first project."""
    store = SqliteIdentityStore(tmp_path / "identity.sqlite3", "m" * 32)
    domain = await store.create_domain("acme")
    user = await store.create_user(domain.id, "alice", "alice-password")
    projects = [(await store.create_project(domain.id, name)).id for name in project_names]
    key, sk = await store.create_access_key(user.id)
    token, _ = await store.issue_token(user.id, projects[0])
    authenticator = Authenticator(
        store, clock_skew=timedelta(minutes=15), trusted_proxies=(ipaddress.ip_network("10.0.0.0/24"),)
    )
    return Account(authenticator, store, user.id, projects, key.ak, sk, token)


def signed(ak: str, sk: str, *, host: str = "tagging.example.com", client_host: str | None = "127.0.0.1",
           path: str = "/v2.0/image/tagging", body: Body | None = None, **extra: str) -> IncomingRequest:
    """A request as the SDK signs and sends it: the signed Host is `host`."""
    request = SdkRequest(method="POST", schema="https", host=host, resource_path=path, query_params=[],
                         header_params={"Content-Type": "application/json", **extra}, body=BODY)
    Signer(BasicCredentials(ak, sk)).sign(request)
    headers = {name.lower(): value for name, value in request.header_params.items()}
    return IncomingRequest("POST", path, "", headers, (body or Body(BODY)).sha256, client_host)


def with_token(token: str, body: Body | None = None, **extra: str) -> IncomingRequest:
    headers = {"x-auth-token": token, **extra}
    return IncomingRequest("POST", "/v2.0/image/tagging", "", headers, (body or Body()).sha256, None)


def run(tmp_path, test, *project_names: str):
    async def main():
        opened = await account(tmp_path, *(project_names or ("cn-north-4",)))
        try:
            return await test(opened)
        finally:
            await opened.store.close()

    return asyncio.run(main())


def test_a_token_names_its_user_and_project(tmp_path):
    async def test(a: Account) -> None:
        principal = await a.authenticator.identify(with_token(a.token), None)
        assert (principal.user_id, principal.project.id, principal.access_key, principal.method) == (
            a.user_id, a.projects[0], None, "token")
        assert (await a.authenticator.identify(with_token(a.token), a.projects[0])).project.id == a.projects[0]
        await a.store.revoke_token(a.token)
        with pytest.raises(InvalidCredentials, match="invalid, expired or revoked"):
            await a.authenticator.identify(with_token(a.token), None)

    run(tmp_path, test)


def test_a_token_is_for_its_own_project_only(tmp_path):
    async def test(a: Account) -> None:
        for request, path_project in [(with_token(a.token), a.projects[1]),
                                      (with_token(a.token, **{"x-project-id": a.projects[1]}), None)]:
            with pytest.raises(ProjectForbidden, match="scoped to another project"):
                await a.authenticator.identify(request, path_project)

    run(tmp_path, test, "cn-north-4", "cn-east-3")


def test_a_signature_names_its_key_and_takes_the_project_from_the_path_or_header(tmp_path):
    async def test(a: Account) -> None:
        by_path = await a.authenticator.identify(signed(a.ak, a.sk), a.projects[1])
        assert (by_path.project.id, by_path.access_key, by_path.method) == (a.projects[1], a.ak, "aksk")
        by_header = await a.authenticator.identify(signed(a.ak, a.sk, **{"X-Project-Id": a.projects[0]}), None)
        assert by_header.project.id == a.projects[0]
        # The path wins over the header when both name one.
        both = await a.authenticator.identify(signed(a.ak, a.sk, **{"X-Project-Id": a.projects[0]}), a.projects[1])
        assert both.project.id == a.projects[1]
        with pytest.raises(ProjectForbidden, match="several projects"):
            await a.authenticator.identify(signed(a.ak, a.sk), None)
        with pytest.raises(ProjectForbidden, match="no access to project"):
            await a.authenticator.identify(signed(a.ak, a.sk), "f" * 32)

    run(tmp_path, test, "cn-north-4", "cn-east-3")


def test_an_account_with_one_project_needs_none_named(tmp_path):
    async def test(a: Account) -> None:
        assert (await a.authenticator.identify(signed(a.ak, a.sk), None)).project.id == a.projects[0]
        account_wide = await a.authenticator.identify_domain(signed(a.ak, a.sk))
        assert account_wide.project is None and account_wide.user_id == a.user_id

    run(tmp_path, test)


def test_credentials_that_are_missing_or_of_another_kind(tmp_path):
    async def test(a: Account) -> None:
        with pytest.raises(MissingCredentials):
            await a.authenticator.identify(IncomingRequest("POST", "/", "", {}, Body().sha256, None), None)
        basic = IncomingRequest("POST", "/", "", {"authorization": "Basic YWxpY2U6cGFzcw=="}, Body().sha256, None)
        with pytest.raises(InvalidCredentials, match="unsupported Authorization scheme"):
            await a.authenticator.identify(basic, None)
        await a.store.set_access_key_enabled(a.ak, False)
        with pytest.raises(InvalidCredentials, match="unknown or disabled access key"):
            await a.authenticator.identify(signed(a.ak, a.sk), None)

    run(tmp_path, test)


def test_behind_a_trusted_proxy_the_signed_host_is_the_forwarded_one(tmp_path):
    async def test(a: Account) -> None:
        # The proxy connects with its own Host and passes the client's on in X-Forwarded-Host.
        request = signed(a.ak, a.sk, client_host=PROXY)
        forwarded = IncomingRequest(request.method, request.raw_path, request.query,
                                    {**request.headers, "host": "gateway:8080",
                                     "x-forwarded-host": "tagging.example.com, inner.proxy"},
                                    request.body_sha256, request.client_host)
        assert (await a.authenticator.identify(forwarded, None)).access_key == a.ak
        for client_host in ("192.0.2.1", None, "not-an-address"):  # anyone else may not vouch for a Host
            untrusted = IncomingRequest(forwarded.method, forwarded.raw_path, forwarded.query, forwarded.headers,
                                        forwarded.body_sha256, client_host)
            with pytest.raises(InvalidCredentials):
                await a.authenticator.identify(untrusted, None)

    run(tmp_path, test)


def test_the_body_is_read_only_for_a_signature_worth_checking(tmp_path):
    async def test(a: Account) -> None:
        unread = {"token": Body(BODY), "bad token": Body(BODY), "none": Body(BODY), "unknown key": Body(BODY),
                  "stale date": Body(BODY)}
        await a.authenticator.identify(with_token(a.token, unread["token"]), None)
        refused = [
            with_token("not-a-token", unread["bad token"]),
            IncomingRequest("POST", "/", "", {}, unread["none"].sha256, None),
            signed("AKUNKNOWN0000000000", a.sk, body=unread["unknown key"]),
        ]
        stale = signed(a.ak, a.sk, body=unread["stale date"])
        refused.append(IncomingRequest(stale.method, stale.raw_path, stale.query,
                                       {**stale.headers, "x-sdk-date": "20200101T000000Z"},
                                       stale.body_sha256, stale.client_host))
        for request in refused:
            with pytest.raises((MissingCredentials, InvalidCredentials)):
                await a.authenticator.identify(request, None)
        assert {name: body.reads for name, body in unread.items()} == dict.fromkeys(unread, 0)

        read = {"right key": Body(BODY), "wrong secret": Body(BODY)}
        await a.authenticator.identify(signed(a.ak, a.sk, body=read["right key"]), None)
        with pytest.raises(InvalidCredentials, match="signature does not match"):
            await a.authenticator.identify(signed(a.ak, a.sk + "x", body=read["wrong secret"]), None)
        assert {name: body.reads for name, body in read.items()} == dict.fromkeys(read, 1)

    run(tmp_path, test)
