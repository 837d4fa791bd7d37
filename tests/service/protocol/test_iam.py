"""The IAM login body: what clients send is read leniently, what cannot work is the catalogue error."""

from __future__ import annotations

import pytest

from service.errors import InvalidParameter
from service.protocol.iam import TokenRequest


def body(methods=("password",), project=None, password="pw", **extra) -> dict:
    return {"auth": {
        "identity": {"methods": list(methods), "password": {"user": {
            "domain": {"name": "acme"}, "name": "alice", "password": password, **extra}}},
        "scope": {"project": {"name": "cn-north-4"} if project is None else project}}}


def test_fields_the_sdk_adds_are_ignored():
    request = TokenRequest.parse({**body(methods=["password", "totp"], password_expires_at=""), "server": "x"})
    user = request.auth.identity.password.user
    assert (user.domain.name, user.name, request.auth.scope.project.name) == ("acme", "alice", "cn-north-4")


@pytest.mark.parametrize("payload, message", [
    (body(methods=["token"]), "auth.identity: only the password method is supported"),
    (body(project={}), "auth.scope: scope.project needs a name or an id"),
    (body(password=""), "auth.identity.password.user.password: String should have at least 1 character"),
    ({"auth": {}}, "auth.identity: Field required"),
])
def test_a_login_that_cannot_work_names_its_first_problem(payload, message):
    with pytest.raises(InvalidParameter) as refused:
        TokenRequest.parse(payload)
    assert str(refused.value) == message
