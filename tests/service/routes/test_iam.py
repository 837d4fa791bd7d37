"""IAM tokens and AK/SK end to end: two gateways sharing a real redis-server, real clients.

The gateways are the real app (`build_components`, `create_app`, uvicorn on loopback) with a fake
inference client: every rule here is decided before the models, which have tests of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import httpx
import pytest
import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials, GlobalCredentials
from huaweicloudsdkcore.region.region import Region
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from huaweicloudsdkiam.v3 import (
    IamClient,
    KeystoneCreateUserTokenByPasswordRequest,
    KeystoneCreateUserTokenByPasswordRequestBody,
    PwdAuth,
    PwdIdentity,
    PwdPassword,
    PwdPasswordUser,
    PwdPasswordUserDomain,
    AuthScope,
    AuthScopeProject,
)
from huaweicloudsdkimage.v2 import ImageClient, ImageTaggingReq, RunImageTaggingRequest

from tests.conftest import REPO, RedisProcess, photo_base64, start_server, stop_server
from tests.service.fakes import gateway

MASTER_KEY = "test-master-key-for-the-iam-suite"
CAT = photo_base64("cat_chelsea.jpg")


def admin(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "admin", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    )
    return result.stdout


class Deployment:
    def __init__(self, env, gateways, dev, other, redis):
        self.redis = redis
        self.env = env
        self.gateways = gateways
        self.dev = dev
        self.other = other

    @property
    def url(self) -> str:
        return self.gateways[0].base_url


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    # A Redis of its own that keeps its data across a restart: the outage test stops it.
    redis_server = RedisProcess(tmp_path_factory.mktemp("iam-redis"), persistent=True)
    redis_server.start()
    env = {
        "IMAGETAG_AUTH_MODE": "iam",
        "IMAGETAG_REDIS_URL": redis_server.url,
        "IMAGETAG_MASTER_KEY": MASTER_KEY,
        "IMAGETAG_RATE_LIMIT_PER_S": "1000",
        "IMAGETAG_RATE_LIMIT_BURST": "1000",
    }
    directory = tmp_path_factory.mktemp("iam")
    env["IMAGETAG_DATA_DIR"] = str(directory / "admin-data")
    dev = json.loads(admin(env, "dev-credentials", "--json"))
    admin(env, "accounts", "create", "other")
    admin(env, "users", "create", "--domain", "other", "bob", "--password", "bob-password-1")
    other_project = admin(env, "projects", "create", "--domain", "other", "cn-north-4").split()[0]
    keys = admin(env, "keys", "create", "--domain", "other", "--user", "bob")
    other = {"project_id": other_project, "ak": keys.split()[1], "sk": keys.split()[3]}
    settings = {"auth_mode": "iam", "redis_url": redis_server.url, "master_key": MASTER_KEY,
                "rate_limit_per_s": 1000, "rate_limit_burst": 1000}
    with ExitStack() as stack:
        gateways = [stack.enter_context(gateway(directory / f"gateway-{i}", **settings)) for i in range(2)]
        yield Deployment(env, gateways, dev, other, redis_server)
    redis_server.stop()


def login_body(dev: dict, project: dict | None = None) -> dict:
    return {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": dev["domain"]}, "name": dev["user"], "password": dev["password"]}}},
        "scope": {"project": project or {"name": dev["project_name"]}},
    }}


def login(base_url: str, dev: dict, project: dict | None = None, **params) -> requests.Response:
    return requests.post(f"{base_url}/v3/auth/tokens", json=login_body(dev, project), params=params, timeout=30)


def client_at(address: str) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x.y.z is this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def signed(base_url: str, ak: str, sk: str, path: str, body: bytes, headers: dict | None = None,
           date: datetime | None = None) -> tuple[str, dict[str, str]]:
    """Headers as the SDK's own signer makes them."""
    host = urlparse(base_url).netloc
    header_params = {"Content-Type": "application/json;charset=utf-8", **(headers or {})}
    if date is not None:
        header_params["X-Sdk-Date"] = date.strftime("%Y%m%dT%H%M%SZ")
    request = SdkRequest(method="POST", schema="http", host=host, resource_path=path, query_params=[],
                         header_params=header_params, body=body)
    Signer(BasicCredentials(ak, sk)).sign(request)
    return request.url, request.header_params


def tagging_body() -> bytes:
    return json.dumps({"image": CAT, "language": "en", "limit": 5}).encode()


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    assert response.headers["X-Request-Id"]


# --- clients that must work unchanged --------------------------------------------------------

def test_sdk_with_ak_sk_and_project_id(deployment):
    dev = deployment.dev
    client = (ImageClient.new_builder()
              .with_credentials(BasicCredentials(dev["ak"], dev["sk"], dev["project_id"]))
              .with_endpoint(deployment.url).build())
    response = client.run_image_tagging(RunImageTaggingRequest(body=ImageTaggingReq(image=CAT, language="en", limit=5)))
    assert "cat" in [t.tag for t in response.result.tags]


def test_sdk_discovers_the_project_from_its_region(deployment):
    dev, url = deployment.dev, deployment.gateways[1].base_url
    credentials = BasicCredentials(dev["ak"], dev["sk"]).with_iam_endpoint(url)
    client = (ImageClient.new_builder().with_credentials(credentials)
              .with_region(Region(dev["project_name"], url)).build())
    response = client.run_image_tagging(RunImageTaggingRequest(body=ImageTaggingReq(image=CAT, language="zh", limit=5)))
    assert "猫" in [t.tag for t in response.result.tags]
    assert credentials.project_id == dev["project_id"]


def test_seed_python_sample_flow(deployment):
    # The vendor's own sample: a token from IAM, then plain requests with X-Auth-Token on /v1.0.
    response = login(deployment.url, deployment.dev)
    assert response.status_code == 201, response.text
    token = response.headers["X-Subject-Token"]
    # Any replica accepts a token, whichever issued it.
    url = f"{deployment.gateways[1].base_url}/v1.0/image/tagging"
    headers = {"Content-Type": "application/json", "X-Auth-Token": token}
    tagged = requests.post(url, headers=headers, json={"image": CAT}, timeout=60)
    assert tagged.status_code == 200, tagged.text
    assert "猫" in [t["tag"] for t in tagged.json()["result"]["tags"]]
    assert int(tagged.headers["X-RateLimit-Remaining"]) < int(tagged.headers["X-RateLimit-Limit"])


def test_token_body_follows_iam(deployment):
    dev = deployment.dev
    with_catalog = login(deployment.url, dev, {"id": dev["project_id"]}).json()["token"]
    assert with_catalog["project"] == {"id": dev["project_id"], "name": dev["project_name"],
                                       "domain": with_catalog["user"]["domain"]}
    assert with_catalog["user"]["name"] == dev["user"] and with_catalog["methods"] == ["password"]
    issued = datetime.strptime(with_catalog["issued_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    expires = datetime.strptime(with_catalog["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert expires - issued == timedelta(hours=24)
    assert with_catalog["catalog"][0]["endpoints"][0]["url"] == deployment.url
    assert "catalog" not in login(deployment.url, dev, nocatalog="true").json()["token"]


def test_sdk_iam_client_gets_a_token(deployment):
    dev = deployment.dev
    client = (IamClient.new_builder().with_credentials(GlobalCredentials(dev["ak"], dev["sk"]))
              .with_endpoint(deployment.url).build())
    user = PwdPasswordUser(domain=PwdPasswordUserDomain(name=dev["domain"]), name=dev["user"], password=dev["password"])
    body = KeystoneCreateUserTokenByPasswordRequestBody(auth=PwdAuth(
        identity=PwdIdentity(methods=["password"], password=PwdPassword(user=user)),
        scope=AuthScope(project=AuthScopeProject(name=dev["project_name"]))))
    response = client.keystone_create_user_token_by_password(KeystoneCreateUserTokenByPasswordRequest(body=body))
    assert response.x_subject_token
    assert response.token.project.id == dev["project_id"]
    tagged = requests.post(f"{deployment.url}/v2/{dev['project_id']}/image/tagging", json={"image": CAT},
                           headers={"X-Auth-Token": response.x_subject_token}, timeout=60)
    assert tagged.status_code == 200


# --- refusals ---------------------------------------------------------------------------------

def tag_path(deployment) -> str:
    return f"/v2/{deployment.dev['project_id']}/image/tagging"


def test_no_credentials(deployment):
    assert_error(requests.post(deployment.url + tag_path(deployment), data=tagging_body(), timeout=30),
                 401, "ModelArts.4101")


def test_no_credentials_is_checked_before_the_body(deployment):
    assert_error(requests.post(deployment.url + "/v1.0/image/tagging", data=b"not json", timeout=30),
                 401, "ModelArts.4101")


@pytest.mark.parametrize("token", ["garbage", "x" * 64, "MIIB" + "A" * 300])
def test_malformed_token(deployment, token):
    response = requests.post(deployment.url + tag_path(deployment), data=tagging_body(),
                             headers={"X-Auth-Token": token}, timeout=30)
    assert_error(response, 401, "APIG.0301")


def store_call(deployment, method: str, *args):
    """Runs one identity-store call against the deployment's Redis, as an operator tool would."""
    from redis.asyncio import Redis

    from service.identity import RedisIdentityStore

    async def call():
        client = Redis.from_url(deployment.env["IMAGETAG_REDIS_URL"])
        try:
            return await getattr(RedisIdentityStore(client, MASTER_KEY), method)(*args)
        finally:
            await client.aclose()

    return asyncio.run(call())


def test_expired_token(deployment):
    dev = deployment.dev
    token = login(deployment.url, dev).json()["token"]
    short, _ = store_call(deployment, "issue_token", token["user"]["id"], dev["project_id"], timedelta(seconds=1))
    time.sleep(1.5)
    response = requests.post(deployment.url + tag_path(deployment), data=tagging_body(),
                             headers={"X-Auth-Token": short}, timeout=30)
    assert_error(response, 401, "APIG.0301")


@pytest.mark.parametrize("how", ["api", "admin"])
def test_revoked_token(deployment, how):
    token = login(deployment.url, deployment.dev).headers["X-Subject-Token"]
    if how == "api":
        other_token = login(deployment.url, deployment.dev).headers["X-Subject-Token"]
        response = requests.delete(f"{deployment.gateways[1].base_url}/v3/auth/tokens",
                                   headers={"X-Auth-Token": other_token, "X-Subject-Token": token}, timeout=10)
        assert response.status_code == 204, response.text
    else:
        # After "--": a token may start with "-", which would read as an option.
        assert admin(deployment.env, "tokens", "revoke", "--", token).strip() == "revoked"
    for gateway in deployment.gateways:
        response = requests.post(gateway.base_url + tag_path(deployment), data=tagging_body(),
                                 headers={"X-Auth-Token": token}, timeout=30)
        assert_error(response, 401, "APIG.0301")


def send_signed(deployment, ak, sk, body=None, sent_body=None, headers=None, tamper=None, date=None, path=None):
    body = body if body is not None else tagging_body()
    url, signed_headers = signed(deployment.url, ak, sk, path or tag_path(deployment), body, headers, date)
    if tamper:
        signed_headers = {**signed_headers, **tamper}
    return requests.post(url, data=sent_body if sent_body is not None else body, headers=signed_headers, timeout=60)


def test_signed_request_is_accepted(deployment):
    dev = deployment.dev
    response = send_signed(deployment, dev["ak"], dev["sk"], headers={"X-Project-Id": dev["project_id"]})
    assert response.status_code == 200, response.text


def test_wrong_sk(deployment):
    assert_error(send_signed(deployment, deployment.dev["ak"], "wrong" + deployment.dev["sk"][5:]), 401, "APIG.0301")


def test_unknown_ak(deployment):
    assert_error(send_signed(deployment, "AKUNKNOWN00000000000", deployment.dev["sk"]), 401, "APIG.0301")


def test_tampered_body(deployment):
    dev = deployment.dev
    tampered = json.dumps({"image": CAT, "language": "zh", "limit": 5}).encode()
    assert_error(send_signed(deployment, dev["ak"], dev["sk"], sent_body=tampered), 401, "APIG.0301")


def test_tampered_signed_header(deployment):
    dev = deployment.dev
    response = send_signed(deployment, dev["ak"], dev["sk"], headers={"X-Project-Id": dev["project_id"]},
                           tamper={"X-Project-Id": deployment.other["project_id"]})
    assert_error(response, 401, "APIG.0301")


def test_stale_sdk_date(deployment):
    dev = deployment.dev
    stale = datetime.now(UTC) - timedelta(minutes=20)
    assert_error(send_signed(deployment, dev["ak"], dev["sk"], date=stale), 401, "APIG.0301")


def test_another_projects_credentials(deployment):
    other = deployment.other
    assert_error(send_signed(deployment, other["ak"], other["sk"]), 403, "ModelArts.4203")
    token = login(deployment.url, deployment.dev).headers["X-Subject-Token"]
    response = requests.post(f"{deployment.url}/v2/{other['project_id']}/image/tagging", data=tagging_body(),
                             headers={"X-Auth-Token": token}, timeout=30)
    assert_error(response, 403, "ModelArts.4203")


def test_disabled_key(deployment):
    other = deployment.other
    admin(deployment.env, "keys", "disable", other["ak"])
    try:
        path = f"/v2/{other['project_id']}/image/tagging"
        assert_error(send_signed(deployment, other["ak"], other["sk"], path=path), 401, "APIG.0301")
    finally:
        admin(deployment.env, "keys", "enable", other["ak"])
    assert send_signed(deployment, other["ak"], other["sk"], path=path).status_code == 200


def test_wrong_password_and_login_brute_force(deployment):
    bob = {"domain": "other", "user": "bob", "password": "bob-password-1", "project_name": "cn-north-4"}
    assert login(deployment.url, bob).status_code == 201
    wrong = {**bob, "password": "not-the-password"}
    responses = [login(deployment.gateways[i % 2].base_url, wrong) for i in range(14)]
    assert_error(responses[0], 401, "APIG.0301")
    # 10 attempts a minute per user by default, counted across both gateways.
    assert [r.status_code for r in responses].count(429) >= 3
    limited = login(deployment.url, bob)  # even the right password must wait now
    assert_error(limited, 429, "APIG.0308")
    assert int(limited.headers["Retry-After"]) >= 1


@pytest.fixture(params=["redis", "embedded"])
def login_target(request, tmp_path):
    """(gateway URL, a user of its own) on the shared-Redis deployment or on the embedded store."""
    if request.param == "redis":
        deployment = request.getfixturevalue("deployment")
        name = f"user-{time.monotonic_ns()}"
        admin(deployment.env, "users", "create", "--domain", "other", name, "--password", "right-password-1")
        yield deployment.url, {"domain": "other", "user": name, "password": "right-password-1",
                               "project_name": "cn-north-4"}
        return
    data = tmp_path / "data"
    dev = json.loads(admin({"IMAGETAG_DATA_DIR": str(data)}, "dev-credentials", "--json"))
    with gateway(data, auth_mode="iam") as server:
        yield server.base_url, dev


def test_a_guesser_polling_from_one_address_cannot_keep_the_user_out(login_target):
    url, user = login_target
    wrong = [{**user, "password": f"guess-{i}"} for i in range(5)]
    guesses: list[int] = []
    stop = threading.Event()

    def guess() -> None:
        with client_at("127.0.0.2") as attacker:
            while not stop.is_set():
                body = login_body(wrong[len(guesses) % len(wrong)])
                guesses.append(attacker.post(f"{url}/v3/auth/tokens", json=body).status_code)
                time.sleep(0.1)

    guesser = threading.Thread(target=guess)
    guesser.start()
    started = time.monotonic()
    try:
        time.sleep(2)  # the guesser has used up its address's tries
        with client_at("127.0.0.3") as real_user:
            logins = []
            for _ in range(30):
                logins.append(real_user.post(f"{url}/v3/auth/tokens", json=login_body(user)).status_code)
                time.sleep(0.1)
    finally:
        stop.set()
        guesser.join()
    assert logins == [201] * 30
    assert set(guesses) == {401, 429}
    # 10 failures a minute per user and address (the default), all at once at first.
    assert guesses.count(401) <= 10 + (time.monotonic() - started) / 6 + 1, guesses
    assert guesses.count(429) > 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`imagetag serve` itself (as operators run it: uvicorn as the CLI configures it), embedded store."""
    directory = tmp_path_factory.mktemp("serve")
    env = {"IMAGETAG_AUTH_MODE": "iam", "IMAGETAG_DATA_DIR": str(directory / "data")}
    dev = json.loads(admin(env, "dev-credentials", "--json"))
    server = start_server(directory, env=env)
    yield server, dev
    stop_server(server)


def test_a_spoofed_x_forwarded_for_buys_no_fresh_tries(served):
    server, dev = served
    wrong = {**dev, "password": "not-the-password"}
    statuses = [
        requests.post(server.url("/v3/auth/tokens"), json=login_body(wrong), timeout=30,
                      headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
        for i in range(15)
    ]
    assert statuses == [401] * 10 + [429] * 5


def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(tmp_path):
    data = tmp_path / "data"
    dev = json.loads(admin({"IMAGETAG_DATA_DIR": str(data)}, "dev-credentials", "--json"))
    wrong = {**dev, "password": "not-the-password"}
    with gateway(data, auth_mode="iam", trusted_proxies=["127.0.0.1/32"]) as proxied:

        def through_proxy(user: dict, forwarded_for: str) -> int:
            # The proxy appends the address it was connected from to whatever the client sent.
            return requests.post(proxied.url("/v3/auth/tokens"), json=login_body(user), timeout=30,
                                 headers={"X-Forwarded-For": forwarded_for}).status_code

        assert [through_proxy(wrong, "198.51.100.66") for _ in range(10)] == [401] * 10
        assert through_proxy(wrong, "198.51.100.66") == 429
        # The guesser claims to be the user: the proxy's hop after it still names the guesser.
        assert through_proxy(dev, "198.51.100.7, 198.51.100.66") == 429
        assert through_proxy(dev, "198.51.100.7") == 201  # the real user, behind the same proxy


def test_hostile_login_bodies_get_the_contract_400(deployment):
    url = f"{deployment.url}/v3/auth/tokens"
    deep = b"[" * 30_000 + b"]" * 30_000  # within the 64 KiB a login may take
    assert_error(requests.post(url, data=deep, timeout=30), 400, "AIS.0014")
    long_number = b'{"auth": {"identity": ' + b"9" * 5_000 + b"}}"
    assert_error(requests.post(url, data=long_number, timeout=30), 400, "AIS.0501")


def test_a_login_body_larger_than_a_login_is_refused_unread(deployment):
    url = f"{deployment.url}/v3/auth/tokens"
    empty_arrays = b"[" + b"[]," * 4_000_000 + b"[]]"  # 12 MB: parsed, it took seconds
    started = time.monotonic()
    assert_error(requests.post(url, data=empty_arrays, timeout=30), 413, "APIG.0201")
    assert time.monotonic() - started < 5

    def streamed():  # no Content-Length: counted as it arrives
        yield b"{" + b" " * (64 * 1024)
        yield b"}"

    assert_error(requests.post(url, data=streamed(), timeout=30), 413, "APIG.0201")


# --- limits shared through Redis ----------------------------------------------------------------

def test_two_gateways_enforce_one_rate_limit(deployment):
    dev = deployment.dev
    project = admin(deployment.env, "projects", "create", "--domain", dev["domain"], "limited-1").split()[0]
    admin(deployment.env, "projects", "set-rate-limit", project, "--rate", "2", "--burst", "4")
    token = login(deployment.url, dev, {"id": project}).headers["X-Subject-Token"]
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 1.5:
        gateway = deployment.gateways[len(statuses) % 2]
        # "{}" is refused (AIS.0501) after admission, so each call is cheap but still counted.
        response = requests.post(f"{gateway.base_url}/v2/{project}/image/tagging", data=b"{}",
                                 headers={"X-Auth-Token": token}, timeout=10)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error_code"] == "APIG.0308"
            assert int(response.headers["Retry-After"]) >= 1
    elapsed = time.monotonic() - started
    admitted = statuses.count(400)
    assert set(statuses) <= {400, 429}
    assert 4 <= admitted <= 4 + 2 * elapsed + 1, (admitted, elapsed, len(statuses))
    assert statuses.count(429) > 10


def test_redis_outage_answers_503_quickly_then_recovers(deployment):
    token = login(deployment.url, deployment.dev).headers["X-Subject-Token"]
    path = tag_path(deployment)

    def call(gateway):
        started = time.monotonic()
        response = requests.post(gateway.base_url + path, data=b"{}", headers={"X-Auth-Token": token}, timeout=10)
        return response, time.monotonic() - started

    deployment.redis.stop()
    try:
        for gateway in deployment.gateways * 3:
            response, elapsed = call(gateway)
            assert_error(response, 503, "AIS.0506")
            assert elapsed < 2.5
    finally:
        deployment.redis.start()
    deadline = time.monotonic() + 15
    recovered = set()
    while time.monotonic() < deadline and len(recovered) < 2:
        for index, gateway in enumerate(deployment.gateways):
            if call(gateway)[0].status_code == 400:  # admitted again: "{}" is the body's fault
                recovered.add(index)
        time.sleep(0.2)
    assert recovered == {0, 1}
