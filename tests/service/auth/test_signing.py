"""SDK-HMAC-SHA256 verification: the contract's vectors, the real SDK signer, and forgeries."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from huaweicloudsdkimage.v2 import ImageClient, ImageTaggingReq, RunImageTaggingRequest

from service.auth.signing import (
    RequestToSign,
    SdkAuthorization,
    SignatureError,
    canonical_request,
    parse_authorization,
    signature,
    verify,
)
from service.errors import status_and_code
from tests.conftest import REPO

AK, SK = "AKTESTEXAMPLE0000001", "SKtestExampleSecretKey00000000000000001"
PROJECT = "0123456789abcdef0123456789abcdef"
HOST = "127.0.0.1:8080"
SDK_DATE = "20240101T000000Z"
SIGNED_AT = datetime(2024, 1, 1, tzinfo=timezone.utc)
COMMON = {"Host": HOST, "User-Agent": "huaweicloud-usdk-python/3.0", "X-Sdk-Date": SDK_DATE}
TAGGING_BODY = b'{"image": "aGVsbG8=", "language": "en", "threshold": 30.0, "limit": 5}'
GET_SIGNED = ("host", "user-agent", "x-sdk-date")


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def wire(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> RequestToSign:
    path, _, query = target.partition("?")
    return RequestToSign(method, path, query, headers, sha256(body))


def vector_1() -> tuple[RequestToSign, SdkAuthorization]:
    headers = {**COMMON, "Content-Type": "application/json;charset=utf-8", "X-Project-Id": PROJECT}
    request = wire("POST", f"/v2/{PROJECT}/image/tagging", headers, TAGGING_BODY)
    authorization = SdkAuthorization(
        AK,
        ("content-type", "host", "user-agent", "x-project-id", "x-sdk-date"),
        "a976ff9c38e2dbb0810a906373c1f90cecc54e63e46fbaef8dc4ee90db8d88b8",
    )
    return request, authorization


def self_signed(request: RequestToSign, names: tuple[str, ...], secret: str = SK) -> SdkAuthorization:
    return SdkAuthorization(AK, names, signature(secret, request, names))


# The contract's test vectors


def test_vector_1_tagging_post():
    request, authorization = vector_1()
    assert hashlib.sha256(TAGGING_BODY).hexdigest() == (
        "24f8cc6ac46e6db913f854bc4a8435fa9518dc05a3c102b824922ead63bee5bb"
    )
    assert signature(SK, request, authorization.signed_headers) == authorization.signature
    verify(SK, request, authorization, now=SIGNED_AT)


def test_vector_2_iam_projects_get():
    request = wire("GET", "/v3/projects?name=cn-north-4", COMMON)
    expected = "5659c38815fe6f6f844b9e1157c68a4e02c8f08bae6e71dfda4e33d0394b8fbd"
    assert signature(SK, request, GET_SIGNED) == expected
    verify(SK, request, SdkAuthorization(AK, GET_SIGNED, expected), now=SIGNED_AT)


def test_vector_3_query_is_decoded_sorted_and_reencoded():
    request = wire("GET", "/v1/demo/?b=x%20y&a=2&a=1&c=~*/", COMMON)
    lines = canonical_request(request, GET_SIGNED).split("\n")
    assert lines[:3] == ["GET", "/v1/demo/", "a=1&a=2&b=x%20y&c=~%2A%2F"]
    expected = "3341ccc8b9ce8d9fddddd068ec7067a70dd50c8ff25119787dfe05996e756cfa"
    assert signature(SK, request, GET_SIGNED) == expected
    verify(SK, request, SdkAuthorization(AK, GET_SIGNED, expected), now=SIGNED_AT)


def test_canonical_request_layout():
    request, authorization = vector_1()
    assert canonical_request(request, authorization.signed_headers) == (
        f"POST\n/v2/{PROJECT}/image/tagging/\n\n"
        "content-type:application/json;charset=utf-8\nhost:127.0.0.1:8080\n"
        f"user-agent:huaweicloud-usdk-python/3.0\nx-project-id:{PROJECT}\nx-sdk-date:{SDK_DATE}\n\n"
        "content-type;host;user-agent;x-project-id;x-sdk-date\n"
        "24f8cc6ac46e6db913f854bc4a8435fa9518dc05a3c102b824922ead63bee5bb"
    )


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("", ""),
        ("flag", "flag="),
        ("b=1&&a=", "a=&b=1"),
        ("a+b=c+d", "a%2Bb=c%2Bd"),
        ("k=%E7%8C%AB&k=%41", "k=A&k=%E7%8C%AB"),
        ("x=%7e%2d%5F%2E", "x=~-_."),
    ],
)
def test_canonical_query_edge_cases(query, canonical):
    request = wire("GET", f"/v1/x?{query}" if query else "/v1/x", COMMON)
    assert canonical_request(request, GET_SIGNED).split("\n")[2] == canonical


def test_equivalent_wire_encodings_verify_alike():
    request = wire("GET", "/v1/demo/?b=x%20y&a=2&a=1&c=~*/", COMMON)
    authorization = self_signed(request, GET_SIGNED)
    respelled = wire("GET", "/v1/%64emo/?c=%7E%2A%2F&a=1&b=x%20y&a=2", COMMON)
    verify(SK, respelled, authorization, now=SIGNED_AT)


def test_header_names_are_case_insensitive_and_values_trimmed():
    request, authorization = vector_1()
    shouted = {name.upper(): f"  {value} " for name, value in request.headers.items()}
    verify(SK, replace(request, headers=shouted), authorization, now=SIGNED_AT)


# The real SDK signer: build the SdkRequest as `Client.build_future_request` does, sign it with the
# SDK's own Signer, and verify what `requests` would put on the wire.


def sdk_signed_wire(
    method: str,
    resource_path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    body: bytes,
) -> tuple[RequestToSign, SdkAuthorization]:
    sdk_request = SdkRequest(
        method=method, schema="http", host=HOST, resource_path=resource_path, query_params=query,
        header_params=dict(headers), body=body,
    )
    Signer(BasicCredentials(AK, SK)).sign(sdk_request)
    sent = requests.Request(method, sdk_request.url, headers=sdk_request.header_params, data=body).prepare()
    path, _, query_string = sent.path_url.partition("?")
    request = RequestToSign(method, path, query_string, sent.headers, sha256(sent.body or b""))
    return request, parse_authorization(sent.headers["Authorization"])


SDK_HEADERS = {"User-Agent": "huaweicloud-usdk-python/3.0", "X-Sdk-Date": SDK_DATE}
JSON = {"Content-Type": "application/json"}
ODD_SEGMENT = quote("图片 集/ü;a=b,c(d)!*'", safe="")  # how the SDK fills a path parameter

SDK_SHAPES = {
    "tagging with project header": (
        "POST", f"/v2/{PROJECT}/image/tagging", [], {**JSON, "X-Project-Id": PROJECT}, TAGGING_BODY,
    ),
    "seed path, no project, utf-8 body": (
        "POST", "/v2.0/image/tagging", [], JSON, '{"url": "http://x/猫.jpg"}'.encode()
    ),
    "no project configured": ("POST", "/v2/%7Bproject_id%7D/image/tagging", [], JSON, TAGGING_BODY),
    "iam projects query": ("GET", "/v3/projects", [("name", "cn-north-4")], {}, b""),
    "query needing encoding": (
        "GET", "/v1/search", [("q", "a b+c/ü~*"), ("tag", "z"), ("tag", "a"), ("empty", "")], JSON, b"",
    ),
    "encoded non-ascii segment": ("GET", f"/v1/{ODD_SEGMENT}/items", [("page", "2")], {"X_Trace": "t1"}, b""),
    "delete, no body": ("DELETE", f"/v1/{ODD_SEGMENT}", [], {"X-Project-Id": PROJECT}, b""),
    # The SDK sends X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD here, yet hashes the empty body.
    "not json, no body": ("GET", "/v3/projects", [], {"Content-Type": "text/plain"}, b""),
}


@pytest.mark.parametrize("shape", SDK_SHAPES.values(), ids=SDK_SHAPES.keys())
def test_sdk_signer_signatures_verify(shape):
    method, resource_path, query, extra, body = shape
    request, authorization = sdk_signed_wire(method, resource_path, query, {**SDK_HEADERS, **extra}, body)
    assert authorization.access_key == AK
    verify(SK, request, authorization, now=SIGNED_AT)
    with pytest.raises(SignatureError):
        verify(SK + "x", request, authorization, now=SIGNED_AT)


def test_sdk_path_really_is_percent_encoded_on_the_wire():
    request, _ = sdk_signed_wire("GET", f"/v1/{ODD_SEGMENT}/items", [], SDK_HEADERS, b"")
    assert "%E5%9B%BE" in request.path and "%2F" in request.path


class Capture(requests.adapters.HTTPAdapter):
    """Answers every request with an empty tag list, keeping what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.sent.append(request)
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/json"
        response._content = b'{"result": {"tags": []}}'
        response.request, response.url = request, request.url
        return response


def test_image_client_request_verifies_end_to_end():
    client = (
        ImageClient.new_builder()
        .with_credentials(BasicCredentials(AK, SK, PROJECT))
        .with_endpoint(f"http://{HOST}")
        .build()
    )
    capture = Capture()
    client.get_http_client()._session.mount(f"http://{HOST}", capture)
    body = ImageTaggingReq(image="aGVsbG8=", language="en", limit=5)
    client.run_image_tagging(RunImageTaggingRequest(body=body))
    [sent] = capture.sent
    path, _, query = sent.path_url.partition("?")
    request = RequestToSign(sent.method, path, query, sent.headers, sha256(sent.body))
    authorization = parse_authorization(sent.headers["Authorization"])
    assert {"host", "x-sdk-date", "x-project-id"} <= set(authorization.signed_headers)
    verify(SK, request, authorization, now=datetime.now(timezone.utc))


# Forgeries and mistakes


def test_wrong_secret_key_is_refused_without_leaking():
    request, authorization = vector_1()
    wrong = "SKsomeoneElsesKey"
    with pytest.raises(SignatureError) as raised:
        verify(wrong, request, authorization, now=SIGNED_AT)
    message = str(raised.value)
    for secret in (wrong, SK, signature(wrong, request, authorization.signed_headers)):
        assert secret not in message


def test_tampered_body_is_refused():
    request, authorization = vector_1()
    tampered = replace(request, body_sha256=sha256(TAGGING_BODY.replace(b'"limit": 5', b'"limit": 6')))
    with pytest.raises(SignatureError):
        verify(SK, tampered, authorization, now=SIGNED_AT)


def test_content_sha256_header_cannot_stand_in_for_another_body():
    request, authorization = vector_1()
    forged_headers = {**request.headers, "X-Sdk-Content-Sha256": sha256(TAGGING_BODY)}
    forged = replace(request, headers=forged_headers, body_sha256=sha256(b'{"url": "http://evil/"}'))
    with pytest.raises(SignatureError, match="X-Sdk-Content-Sha256"):
        verify(SK, forged, authorization, now=SIGNED_AT)


def test_payload_hash_is_x_sdk_content_sha256_when_given():
    request, authorization = vector_1()
    given = {**request.headers, "X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"}
    lines = canonical_request(replace(request, headers=given), authorization.signed_headers).split("\n")
    assert lines[-1] == "UNSIGNED-PAYLOAD"
    upper = hashlib.sha256(TAGGING_BODY).hexdigest().upper()
    request = replace(request, headers={**request.headers, "X-Sdk-Content-Sha256": upper})
    verify(SK, request, self_signed(request, authorization.signed_headers), now=SIGNED_AT)
    assert canonical_request(request, authorization.signed_headers).endswith(f"\n{upper}")


def test_unsigned_payload_is_refused():
    headers = {**SDK_HEADERS, "Content-Type": "application/octet-stream"}
    request, authorization = sdk_signed_wire("POST", "/v2.0/image/tagging", [], headers, TAGGING_BODY)
    assert request.headers["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    with pytest.raises(SignatureError, match="unsigned"):
        verify(SK, request, authorization, now=SIGNED_AT)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Project-Id", "fedcba9876543210fedcba9876543210"),
        ("Host", "127.0.0.1:8081"),
        ("Content-Type", "text/plain"),
    ],
)
def test_tampered_signed_header_is_refused(name, value):
    request, authorization = vector_1()
    with pytest.raises(SignatureError):
        verify(SK, replace(request, headers={**request.headers, name: value}), authorization, now=SIGNED_AT)


@pytest.mark.parametrize("left_out", ["host", "x-sdk-date"])
def test_signature_must_cover_host_and_date(left_out):
    request, _ = vector_1()
    names = tuple(name for name in ("content-type", "host", "x-project-id", "x-sdk-date") if name != left_out)
    authorization = self_signed(request, names)  # a correct signature, just over too little
    with pytest.raises(SignatureError, match=left_out):
        verify(SK, request, authorization, now=SIGNED_AT)


@pytest.mark.parametrize(
    "offset",
    [timedelta(minutes=16), -timedelta(minutes=16), timedelta(minutes=15, seconds=1), timedelta(days=365)],
    ids=["stale 16m", "future 16m", "stale 15m01s", "a year"],
)
def test_sdk_date_too_far_off_is_refused(offset):
    request, authorization = vector_1()
    with pytest.raises(SignatureError, match="X-Sdk-Date"):
        verify(SK, request, authorization, now=SIGNED_AT + offset)


@pytest.mark.parametrize(
    "offset",
    [timedelta(minutes=14), -timedelta(minutes=14), timedelta(minutes=15)],
    ids=["14m", "-14m", "15m"],
)
def test_sdk_date_within_skew_is_accepted(offset):
    request, authorization = vector_1()
    verify(SK, request, authorization, now=SIGNED_AT + offset)


@pytest.mark.parametrize(
    "sdk_date",
    # strptime alone accepts the last one (one-digit day and second).
    ["2024-01-01T00:00:00Z", "20240101T000000", "20241301T000000Z", "20240101T000000Z0", "2024011T00000Z"],
)
def test_unparsable_sdk_date_is_refused(sdk_date):
    request, _ = vector_1()
    request = replace(request, headers={**request.headers, "X-Sdk-Date": sdk_date})
    authorization = self_signed(request, ("host", "x-sdk-date"))
    with pytest.raises(SignatureError, match="YYYYMMDDTHHMMSSZ"):
        verify(SK, request, authorization, now=SIGNED_AT)


def test_missing_sdk_date_is_refused():
    request, authorization = vector_1()
    headers = {name: value for name, value in request.headers.items() if name != "X-Sdk-Date"}
    with pytest.raises(SignatureError, match="X-Sdk-Date"):
        verify(SK, replace(request, headers=headers), authorization, now=SIGNED_AT)


def test_missing_signed_header_is_refused():
    request, authorization = vector_1()
    headers = {name: value for name, value in request.headers.items() if name != "X-Project-Id"}
    with pytest.raises(SignatureError, match="x-project-id"):
        verify(SK, replace(request, headers=headers), authorization, now=SIGNED_AT)


VALID = f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders=host;x-sdk-date, Signature={'ab' * 32}"


def test_parse_authorization_round_trips():
    parsed = parse_authorization(VALID)
    assert parsed == SdkAuthorization(AK, ("host", "x-sdk-date"), "ab" * 32)
    assert parse_authorization(f"  {VALID.replace(', ', ',')}  ") == parsed
    assert parse_authorization(VALID.replace("ab" * 32, "AB" * 32)) == parsed


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        VALID.replace("SDK-HMAC-SHA256", "SDK-HMAC-SM3"),
        VALID.replace("SDK-HMAC-SHA256 ", "SDK-HMAC-SHA256"),
        VALID.replace("SDK-HMAC-SHA256", "sdk-hmac-sha256"),
        VALID.split(", Signature")[0],
        VALID + ", Signature=" + "cd" * 32,
        VALID + ",",
        VALID + ", Extra=1",
        VALID.replace("Access=", "access="),
        VALID.replace(f"Access={AK}", "Access="),
        VALID.replace(f"Access={AK}", "Access=AK with space"),
        VALID.replace("host;x-sdk-date", ""),
        VALID.replace("host;x-sdk-date", "Host;X-Sdk-Date"),
        VALID.replace("host;x-sdk-date", "host;;x-sdk-date"),
        VALID.replace("host;x-sdk-date", "host;host;x-sdk-date"),
        VALID.replace("ab" * 32, "ab" * 31),
        VALID.replace("ab" * 32, "zz" * 32),
        VALID.replace("ab" * 32, "ab" * 31 + "é1"),
        VALID.replace("Signature=", "Signature"),
    ],
)
def test_malformed_authorization_is_refused(value):
    with pytest.raises(SignatureError):
        parse_authorization(value)


def test_naive_now_is_a_programming_error():
    request, authorization = vector_1()
    with pytest.raises(ValueError):
        verify(SK, request, authorization, now=SIGNED_AT.replace(tzinfo=None))


def test_signature_errors_are_the_contract_401():
    assert status_and_code(SignatureError("bad")) == (401, "APIG.0301")


def test_module_imports_no_web_framework():
    probe = (
        "import sys, service.auth.signing;"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'};"
        "sys.exit(f'imported {loaded}' if loaded else 0)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)
