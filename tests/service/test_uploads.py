"""Binary uploads over real HTTP: an image's raw bytes, and multipart forms, on the single-image
and batch paths; the same limits and errors as base64, and AK/SK signatures over the binary body."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from urllib.parse import urlencode, urlparse

import pytest
import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from PIL import Image

from tests.conftest import PHOTOS, REPO, photo_base64
from tests.service import corpus
from tests.service.fakes import gateway

CAT = (PHOTOS / "cat_chelsea.jpg").read_bytes()
BUS = (PHOTOS / "bus.jpg").read_bytes()
ONE = "/v1.0/image/tagging"
BATCH = "/v1.0/image/tagging/batch"


def raw(server, data: bytes, content_type: str = "image/jpeg", path: str = ONE, **params) -> requests.Response:
    return requests.post(server.url(path), data=data, params=params, headers={"Content-Type": content_type}, timeout=60)


def form(server, files: list, fields: dict | None = None, path: str = ONE) -> requests.Response:
    return requests.post(server.url(path), files=files, data=fields or {}, timeout=60)


def tags(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["result"]["tags"]


# Real models on real photos


def test_raw_bytes_get_exactly_the_base64_answer(server):
    as_json = requests.post(server.url(ONE), json={"image": photo_base64("cat_chelsea.jpg"), "language": "en",
                                                   "limit": 5}, timeout=60)
    as_bytes = raw(server, CAT, language="en", limit="5")
    assert tags(as_bytes) == tags(as_json) and "cat" in [t["tag"] for t in tags(as_bytes)]


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "WEBP"])
def test_raw_bytes_of_every_format(server, image_format):
    buffer = io.BytesIO()
    Image.open(PHOTOS / "cat_chelsea.jpg").save(buffer, format=image_format)
    assert "cat" in [t["tag"] for t in tags(raw(server, buffer.getvalue(), f"image/{image_format.lower()}",
                                                  language="en"))]


def test_a_multipart_file_beside_the_options(server):
    response = form(server, [("image", ("cat.jpg", CAT, "image/jpeg"))], {"language": "en", "threshold": "70",
                                                                        "label_structure": "true"})
    found = tags(response)
    assert all(float(t["confidence"]) >= 70 for t in found)
    cat = next(t for t in found if t["tag"] == "cat")
    assert [p["name"] for p in cat["parents"]] == ["mammal", "animal"]


def test_a_multipart_batch_of_files_in_order(server, files_server):
    files = [("image", ("cat.jpg", CAT, "image/jpeg")), ("image", ("notes.txt", b"not an image", "text/plain")),
             ("url", (None, f"{files_server}/dogs_spaniels.jpg")), ("image", ("bus.jpg", BUS, "image/jpeg"))]
    response = form(server, files, {"language": "en"}, BATCH)
    assert response.status_code == 200, response.text
    cat, text, dogs, bus = response.json()["results"]
    assert "cat" in [t["tag"] for t in cat["result"]["tags"]]
    assert text["error_code"] == "AIS.0502"
    assert "dog" in [t["tag"] for t in dogs["result"]["tags"]]
    assert "bus" in [t["tag"] for t in bus["result"]["tags"]]


# Rules decided before the models: the real app with a fake inference client


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    with gateway(tmp_path_factory.mktemp("uploads"), max_base64_bytes=400_000, max_body_bytes=500_000,
                 rate_limit_burst=1000) as server:
        yield server


@pytest.mark.parametrize(
    "send, code",
    [
        (lambda s: raw(s, b"plain text", "image/png"), "AIS.0502"),
        (lambda s: raw(s, corpus.photo_like(10, 10), "image/png"), "AIS.0504"),
        (lambda s: raw(s, b"\xff\xd8\xff" + b"\0" * 400_001), "AIS.0504"),  # over the image cap
        (lambda s: raw(s, CAT, limit="0"), "AIS.0501"),
        (lambda s: raw(s, CAT, limit="many"), "AIS.0501"),
        (lambda s: raw(s, CAT, url="http://x/y.jpg"), "AIS.0012"),
        (lambda s: raw(s, CAT, colour="red"), "AIS.0012"),
        (lambda s: form(s, [("language", (None, "en"))]), "AIS.0501"),  # no image
        (lambda s: form(s, [("image", ("a.jpg", CAT)), ("image", ("b.jpg", CAT))]), "AIS.0501"),
        (lambda s: form(s, [("image", ("a.jpg", CAT))], {"colour": "red"}), "AIS.0012"),
        (lambda s: form(s, [("image", ("a.jpg", CAT)), ("limit", (None, "1")), ("limit", (None, "2"))]), "AIS.0501"),
        (lambda s: form(s, [("image", (None, "not base64!"))]), "AIS.0501"),
        (lambda s: form(s, [("image", ("a.png", corpus.photo_like()))] * 33, path=BATCH), "AIS.0501"),
        (lambda s: raw(s, b"--x\r\nbroken", "multipart/form-data"), "AIS.0014"),
        (lambda s: raw(s, b"--x\r\nContent-Disposition: form-data\r\n\r\n1\r\n--x--\r\n", "multipart/form-data; boundary=x"),
         "AIS.0014"),
        (lambda s: raw(s, b"no boundary at all", "multipart/form-data; boundary=x"), "AIS.0014"),
        (lambda s: raw(s, CAT, path=BATCH), "AIS.0014"),  # a batch is JSON or a form
        (lambda s: raw(s, CAT, "text/plain", path=BATCH), "AIS.0014"),
    ],
)
def test_bad_uploads_get_the_contracts_errors(fake, send, code):
    response = send(fake)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == code and response.json()["error_msg"]


def test_bodies_over_the_cap_are_413_whatever_their_type(fake):
    big = b"\xff\xd8\xff" + b"\0" * 500_001
    for response in (raw(fake, big), form(fake, [("image", ("a.jpg", big))]), form(fake, [("image", ("a.jpg", big))], path=BATCH)):
        assert response.status_code == 413 and response.json()["error_code"] == "APIG.0201"


def test_uploads_reach_the_models_as_sent(fake):
    png = corpus.photo_like(64, 48)
    before = len(fake.inference.images)
    assert tags(raw(fake, png, "image/png", language="en"))[0]["tag"] == "cat"
    assert tags(form(fake, [("image", ("a.png", png, "image/png"))], {"language": "en"}))[0]["tag"] == "cat"
    # A form may also carry the contract's own fields as text.
    assert tags(form(fake, [("image", (None, corpus.b64(png)))]))[0]["tag"] == "猫"
    assert fake.inference.images[before:] == [png, png, png]


def test_the_json_path_is_unchanged_by_a_query_string(fake):
    """Query parameters are options for binary bodies only: a JSON body is read as ever."""
    response = requests.post(fake.url(ONE), json={"image": corpus.b64(corpus.photo_like())}, params={"language": "en"},
                             timeout=30)
    assert tags(response)[0]["tag"] == "猫"


# AK/SK signatures over binary bodies


@pytest.fixture(scope="module")
def signed_gateway(tmp_path_factory):
    directory = tmp_path_factory.mktemp("signed")
    env = {**os.environ, "IMAGETAG_DATA_DIR": str(directory), "IMAGETAG_REDIS_URL": ""}
    env.pop("IMAGETAG_REDIS_URL")
    out = subprocess.run([sys.executable, "-m", "service.cli", "admin", "dev-credentials", "--json"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True).stdout
    with gateway(directory, auth_mode="iam") as server:
        yield server, json.loads(out)


class BodySigner(Signer):
    """The SDK's signer, hashing a binary body as it hashes JSON. Its own marks any body that is
    not JSON `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`, a signature that holds for any body, which
    the service refuses."""

    @classmethod
    def _process_content_header(cls, request: SdkRequest) -> None:
        pass


def signed_post(server, credentials: dict, path: str, body: bytes, content_type: str, query: dict | None = None,
                sent_body: bytes | None = None, signer: type[Signer] = BodySigner) -> requests.Response:
    """Signed by the SDK's algorithm, sent with `requests`."""
    host = urlparse(server.base_url).netloc
    request = SdkRequest(method="POST", schema="http", host=host, resource_path=path,
                         query_params=list((query or {}).items()), header_params={"Content-Type": content_type},
                         body=body)
    signer(BasicCredentials(credentials["ak"], credentials["sk"])).sign(request)
    url = server.url(path) + (f"?{urlencode(query)}" if query else "")
    return requests.post(url, data=body if sent_body is None else sent_body, headers=request.header_params, timeout=30)


def test_signatures_over_raw_and_multipart_bodies_verify(signed_gateway):
    server, credentials = signed_gateway
    png = corpus.photo_like()
    project_path = f"/v2/{credentials['project_id']}/image/tagging"
    response = signed_post(server, credentials, project_path, png, "image/png", {"language": "en", "limit": "1"})
    assert [t["tag"] for t in tags(response)] == ["cat"]
    multipart = requests.Request("POST", "http://x/", files=[("image", ("a.png", png, "image/png")),
                                                              ("image", ("b.png", png, "image/png"))]).prepare()
    response = signed_post(server, credentials, project_path + "/batch", multipart.body,
                           multipart.headers["Content-Type"])
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2


def test_a_binary_body_changed_after_signing_is_refused(signed_gateway):
    server, credentials = signed_gateway
    png = corpus.photo_like()
    before = len(server.inference.images)
    response = signed_post(server, credentials, ONE, png, "image/png", sent_body=png[:-1] + b"\0")
    assert response.status_code == 401 and response.json()["error_code"] == "APIG.0301"
    unsigned = raw(server, png, "image/png")
    assert unsigned.status_code == 401 and unsigned.json()["error_code"] == "ModelArts.4101"
    assert len(server.inference.images) == before


def test_an_unsigned_payload_is_refused(signed_gateway):
    server, credentials = signed_gateway
    response = signed_post(server, credentials, ONE, corpus.photo_like(), "image/png", signer=Signer)
    assert response.status_code == 401 and "unsigned payloads are refused" in response.json()["error_msg"]
