"""Where identities and limits live: by default the embedded SQLite store and limits held in
process; with IMAGETAG_REDIS_URL, Redis for both, under a master key that must be given.

The default follows the README's quick start: `imagetag admin dev-credentials --json`, then the
gateway on the same data folder (the real app, models replaced by a fake client that takes its
time, so that requests overlap), then authenticated calls. `tests/test_wheel.py` runs the same with
real models.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

from service.backends import build_backends, master_key_for
from service.identity import RedisIdentityStore, SqliteIdentityStore
from service.ratelimit import LocalRateLimiter, RedisRateLimiter
from service.settings import ConfigurationError, Settings
from tests.conftest import REPO, photo_base64
from tests.service.fakes import FakeInference, gateway

CAT = photo_base64("cat_chelsea.jpg")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("embedded")
    env = {"IMAGETAG_DATA_DIR": str(directory / "data"), "IMAGETAG_MAX_CONCURRENT_PER_PROJECT": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    )
    credentials = json.loads(result.stdout)
    # IMAGETAG_AUTH_MODE is left to its default, which must be iam.
    with gateway(directory / "data", FakeInference(delay_s=0.3), auth_mode=Settings.model_fields["auth_mode"].default,
                 max_concurrent_per_project=2) as server:
        yield server, credentials, directory


def test_quick_start_token_then_tag(embedded):
    server, credentials, _ = embedded
    login = {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "domain": {"name": credentials["domain"]}, "name": credentials["user"],
            "password": credentials["password"]}}},
        "scope": {"project": {"name": credentials["project_name"]}}}}
    response = requests.post(server.url("/v3/auth/tokens"), json=login, timeout=30)
    assert response.status_code == 201, response.text
    tagged = requests.post(server.url("/v1.0/image/tagging"), json={"image": CAT},
                           headers={"X-Auth-Token": response.headers["X-Subject-Token"]}, timeout=60)
    assert tagged.status_code == 200
    assert "猫" in [t["tag"] for t in tagged.json()["result"]["tags"]]
    anonymous = requests.post(server.url("/v1.0/image/tagging"), json={"image": CAT}, timeout=60)
    assert anonymous.json()["error_code"] == "ModelArts.4101"


def test_concurrency_cap_per_project(embedded):
    server, credentials, _ = embedded
    body = json.dumps({"image": CAT}).encode()

    def call(_):
        request = SdkRequest(method="POST", schema="http", host=urlparse(server.base_url).netloc,
                             resource_path=f"/v2/{credentials['project_id']}/image/tagging", query_params=[],
                             header_params={"Content-Type": "application/json"}, body=body)
        Signer(BasicCredentials(credentials["ak"], credentials["sk"])).sign(request)
        return requests.post(request.url, data=body, headers=request.header_params, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) >= 2
    assert statuses.count(429) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error_code"] == "APIG.0308" and refused.headers["Retry-After"] == "1"


def test_locustfile_runs_headless_against_the_server(embedded, tmp_path):
    server, credentials, _ = embedded
    (tmp_path / "dev.json").write_text(json.dumps(credentials))
    locust = [sys.executable, "-m", "locust", "-f", str(REPO / "load-tests" / "locustfile.py"), "--headless",
              "-u", "2", "-r", "2", "-t", "6s", "--host", server.base_url, "--credentials", str(tmp_path / "dev.json"),
              "--only-summary", "--csv", str(tmp_path / "run")]
    result = subprocess.run(locust, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    import csv

    with (tmp_path / "run_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) >= 4 and int(total["Failure Count"]) == 0
    assert any(name.startswith("token ") for name in rows) and any(name.startswith("aksk ") for name in rows)


def test_redis_holds_both_when_its_url_is_given(tmp_path, redis_server):
    async def main() -> None:
        embedded = build_backends(Settings(data_dir=tmp_path, redis_url=None))
        shared = build_backends(Settings(data_dir=tmp_path, redis_url=redis_server.url, master_key="m" * 32))
        try:
            assert isinstance(embedded.store, SqliteIdentityStore) and embedded.redis is None
            assert isinstance(embedded.limiter, LocalRateLimiter)
            assert isinstance(shared.store, RedisIdentityStore) and isinstance(shared.limiter, RedisRateLimiter)
            assert await shared.redis.ping()
        finally:
            await embedded.close()
            await shared.close()

    asyncio.run(main())


def test_embedded_master_key_is_made_once_and_private(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", redis_url=None)
    key = master_key_for(settings)
    assert master_key_for(settings) == key
    assert oct((tmp_path / "data" / "master.key").stat().st_mode & 0o777) == "0o600"


def test_shared_store_needs_an_explicit_master_key(tmp_path):
    with pytest.raises(ConfigurationError, match="IMAGETAG_MASTER_KEY"):
        build_backends(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
