"""Every error row of the contract that needs no credentials, against the real app with a fake
inference client (the models have tests of their own; these rows never reach them). Pixels that
fail to decode behind a sound header are found with the models: tests/service/routes/test_tagging.py."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from tests.conftest import PHOTOS, photo_base64
from tests.service import corpus
from tests.service.fakes import gateway

TAGGING = "/v2/0123456789abcdef0123456789abcdef/image/tagging"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A short download timeout: the timeout row must not wait out the production 10 s. Limits
    # lifted: these rows come faster than the default burst allows (limits have tests of their own).
    with gateway(tmp_path_factory.mktemp("data"), url_allowed_networks=["127.0.0.1/32"], url_timeout_s=0.5,
                 rate_limit_per_s=1000, rate_limit_burst=1000) as running:
        yield running


def post(server, body, path=TAGGING, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        server.url(path), data=data, headers={"Content-Type": "application/json"}, timeout=60, **kwargs
    )


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error_code"] == code, body
    assert len(body["error_msg"]) > 10
    assert set(body) == {"error_code", "error_msg"}
    assert response.headers["X-Request-Id"]


PNG = corpus.b64(corpus.photo_like())

BAD_BODIES = {
    "not json": (b"image=abc", 400, "AIS.0014"),
    "json array": (b"[1, 2]", 400, "AIS.0014"),
    "json string": (b'"image"', 400, "AIS.0014"),
    "not utf-8": (b'{"image": "\xff\xfe"}', 400, "AIS.0014"),
    "empty body": (b"", 400, "AIS.0014"),
    "100,000-deep array": (b"[" * 100_000 + b"]" * 100_000, 400, "AIS.0014"),
    "50,000-deep image": (b'{"image": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "AIS.0014"),
    "limit of 5,000 digits": (b'{"image": "' + PNG.encode() + b'", "limit": ' + b"9" * 5_000 + b"}", 400, "AIS.0501"),
    "unknown field": ({"image": PNG, "imgae": "x"}, 400, "AIS.0012"),
    "neither image nor url": ({"language": "en"}, 400, "AIS.0501"),
    "both empty": ({"image": "", "url": ""}, 400, "AIS.0501"),
    "both image and url": ({"image": PNG, "url": "http://127.0.0.1/x.jpg"}, 400, "AIS.0501"),
    "image not a string": ({"image": 12345}, 400, "AIS.0501"),
    "threshold too high": ({"image": PNG, "threshold": 100.5}, 400, "AIS.0501"),
    "threshold negative": ({"image": PNG, "threshold": -1}, 400, "AIS.0501"),
    "threshold as string": ({"image": PNG, "threshold": "60"}, 400, "AIS.0501"),
    "limit zero": ({"image": PNG, "limit": 0}, 400, "AIS.0501"),
    "limit too high": ({"image": PNG, "limit": 151}, 400, "AIS.0501"),
    "limit fractional": ({"image": PNG, "limit": 2.5}, 400, "AIS.0501"),
    "unknown language": ({"image": PNG, "language": "fr"}, 400, "AIS.0501"),
    "bad base64": ({"image": "this is *not* base64!"}, 400, "AIS.0501"),
    "text, not an image": ({"image": corpus.b64(b"hello, I am plain text")}, 400, "AIS.0502"),
    "gif": ({"image": corpus.b64(corpus.gif())}, 400, "AIS.0502"),
    "tiff": ({"image": corpus.b64(corpus.tiff())}, 400, "AIS.0502"),
    "unreadable jpeg header": ({"image": corpus.b64(b"\xff\xd8\xff garbage" * 10)}, 400, "AIS.0503"),
    "too small": ({"image": corpus.b64(corpus.photo_like(14, 200))}, 400, "AIS.0504"),
    "too large": ({"image": corpus.b64(corpus.photo_like(4097, 20))}, 400, "AIS.0504"),
    "decompression bomb": ({"image": corpus.b64(corpus.png_bomb())}, 400, "AIS.0504"),
    "base64 over 10 MB": ({"image": "A" * (10 * 1024 * 1024 + 4)}, 400, "AIS.0504"),
    "ftp url": ({"url": "ftp://127.0.0.1/a.jpg"}, 400, "ModelArts.4601"),
    "file url": ({"url": "file:///etc/passwd"}, 400, "ModelArts.4601"),
    "unparsable url": ({"url": "http://[::1"}, 400, "ModelArts.4601"),
    "metadata address": ({"url": "http://169.254.169.254/latest/meta-data/"}, 400, "ModelArts.4601"),
    "private address": ({"url": "http://10.1.2.3/cat.jpg"}, 400, "ModelArts.4601"),
    "ipv6 loopback": ({"url": "http://[::1]:1/cat.jpg"}, 400, "ModelArts.4601"),
    "unspecified address": ({"url": "http://0.0.0.0:1/cat.jpg"}, 400, "ModelArts.4601"),
}


@pytest.mark.parametrize("body, status, code", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_request_gets_the_contract_error(server, body, status, code):
    assert_error(post(server, body), status, code)


def test_body_over_12_mb_is_refused(server):
    assert_error(post(server, b"{" + b" " * (12 * 1024 * 1024 + 1) + b"}"), 413, "APIG.0201")


@pytest.mark.parametrize(
    "name, status, code",
    [("missing.jpg", 400, "ModelArts.4603"), ("notes.txt", 400, "AIS.0502"), ("huge.png", 400, "AIS.0504")],
)
def test_bad_download_gets_the_contract_error(server, files_server, name, status, code):
    assert_error(post(server, {"url": f"{files_server}/{name}"}), status, code)


def test_download_timeout_is_a_clean_error(server):
    import socket

    # A listener that accepts and never answers: the download must give up, not hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        response = post(server, {"url": f"http://127.0.0.1:{silent.getsockname()[1]}/slow.jpg"})
    finally:
        silent.close()
    assert_error(response, 400, "ModelArts.4603")


@pytest.mark.parametrize(
    "method, path",
    [("GET", TAGGING), ("POST", "/v2/p/image/tag"), ("GET", "/nothing/here"), ("DELETE", "/v1.0/image/tagging")],
)
def test_unknown_path_or_method(server, method, path):
    assert_error(requests.request(method, server.url(path), timeout=10), 404, "APIG.0101")


def test_bad_requests_do_not_harm_the_next_one(server):
    for body, *_ in BAD_BODIES.values():
        post(server, body)
    response = post(server, {"image": photo_base64("cat_chelsea.jpg"), "language": "en"})
    assert response.status_code == 200
    assert "cat" in [t["tag"] for t in response.json()["result"]["tags"]]


def test_base64_with_line_breaks_is_accepted(server):
    wrapped = base64.encodebytes((PHOTOS / "cat_chelsea.jpg").read_bytes()).decode()
    assert "\n" in wrapped
    response = post(server, {"image": wrapped.replace("\n", "\r\n"), "language": "en"})
    assert response.status_code == 200, response.text
