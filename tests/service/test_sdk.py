"""The vendor's official Python SDK, unchanged, pointed at this service (contract section 7)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkimage.v2 import ImageClient, ImageTaggingReq, RunImageTaggingRequest

from tests.conftest import photo_base64
from tests.service.fakes import gateway

AK, SK = "AKTESTEXAMPLE0000001", "SKtestExampleSecretKey00000000000000001"
PROJECT = "0123456789abcdef0123456789abcdef"


def client(endpoint: str, config: HttpConfig | None = None) -> ImageClient:
    builder = ImageClient.new_builder().with_credentials(BasicCredentials(AK, SK, PROJECT)).with_endpoint(endpoint)
    if config is not None:
        builder = builder.with_http_config(config)
    return builder.build()


def tag_cat(image_client: ImageClient):
    request = RunImageTaggingRequest(body=ImageTaggingReq(image=photo_base64("cat_chelsea.jpg"), language="en", limit=5))
    return image_client.run_image_tagging(request)


def test_sdk_gets_parsed_tags(server):
    response = tag_cat(client(server.base_url))
    tags = response.result.tags
    assert 0 < len(tags) <= 5
    cat = next(t for t in tags if t.tag == "cat")
    assert isinstance(cat.confidence, str) and float(cat.confidence) > 60
    assert cat.i18n_tag.zh == "猫" and cat.i18n_type.en == "Animal"
    assert cat.instances[0].bounding_box.width > 100


def test_sdk_sees_contract_errors(server):
    request = RunImageTaggingRequest(body=ImageTaggingReq(image=photo_base64("cat_chelsea.jpg"), limit=500))
    with pytest.raises(ClientRequestException) as raised:
        client(server.base_url).run_image_tagging(request)
    assert raised.value.status_code == 400
    assert raised.value.error_code == "AIS.0501"
    assert raised.value.request_id


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    # HTTPS is the gateway's concern, not the models': the real app with a fake inference client
    # (the SDK meets the real models over HTTP above).
    with gateway(directory / "data", tls_certfile=cert, tls_keyfile=key) as running:
        yield running, cert


def test_sdk_over_https_with_an_endpoint_without_scheme(https_server):
    running, cert = https_server
    config = HttpConfig.get_default_config()
    config.ssl_ca_cert = str(cert)
    # No scheme: the SDK assumes https://, as it does for the cloud's own endpoints.
    endpoint = running.base_url.removeprefix("https://")
    response = tag_cat(client(endpoint, config))
    assert "cat" in [t.tag for t in response.result.tags]
