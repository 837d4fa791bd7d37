"""The OpenAPI document: valid, and true to what the service answers over HTTP."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from service.errors import CATALOGUE
from tests.conftest import photo_base64
from tests.service.fakes import build_app, serving

OPERATIONS = 11  # three tagging paths and their three batch paths, three IAM operations, two probes
TAGGING = "/v2/0123456789abcdef0123456789abcdef/image/tagging"


def document(tmp_path, auth_mode: str) -> dict:
    return build_app(tmp_path, auth_mode=auth_mode).openapi()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def media(operation: dict):
    """(where, media type) of every request body type but an image's own bytes (which have no
    example to give), and of every response that has a body (JSON)."""
    for kind, content in operation.get("requestBody", {}).get("content", {}).items():
        if not kind.startswith("image/"):
            yield f"request {kind}", content
    for status, response in operation["responses"].items():
        if "content" in response:
            yield status, response["content"]["application/json"]


@pytest.mark.parametrize("auth_mode", ["iam", "none"])
def test_the_document_is_valid_openapi_with_every_operation(tmp_path, auth_mode):
    spec = document(tmp_path, auth_mode)
    validate(spec)
    assert len(list(operations(spec))) == OPERATIONS
    assert not {"HTTPValidationError", "ValidationError"} & spec["components"]["schemas"].keys()


def test_every_path_parameter_is_declared(tmp_path):
    spec = document(tmp_path, "iam")
    for path, _, operation in operations(spec):
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
    (project_id,) = [p for p in spec["paths"]["/v2/{project_id}/image/tagging"]["post"]["parameters"] if p["in"] == "path"]
    assert project_id["required"] and re.fullmatch(project_id["schema"]["pattern"], project_id["example"])


def test_credentials_are_declared_where_they_are_asked_for(tmp_path):
    iam, open_ = document(tmp_path / "iam", "iam"), document(tmp_path / "none", "none")
    schemes = iam["components"]["securitySchemes"]
    assert schemes["X-Auth-Token"] == schemes["X-Auth-Token"] | {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}
    assert schemes["SDK-HMAC-SHA256"]["name"] == "Authorization"
    assert "X-Sdk-Date" in schemes["SDK-HMAC-SHA256"]["description"]
    both = [{"X-Auth-Token": []}, {"SDK-HMAC-SHA256": []}]
    secured = {(p, m) for p, m, o in operations(iam) if o.get("security") == both}
    tagging = {"/v1.0/image/tagging", "/v2.0/image/tagging", "/v2/{project_id}/image/tagging"}
    assert secured == {(path + batch, "post") for path in tagging for batch in ("", "/batch")} | {
        ("/v3/auth/tokens", "delete"), ("/v3/projects", "get"),
    }
    for path, method in secured:
        operation = open_["paths"][path][method]
        assert operation["security"] == [] and "401" not in operation["responses"], (path, method)


def test_errors_are_the_catalogues_never_a_422(tmp_path):
    for path, method, operation in operations(document(tmp_path, "iam")):
        assert "422" not in operation["responses"], (path, method)
        for status, response in operation["responses"].items():
            if status[0] in "45" and response["content"]["application/json"]["schema"].get("$ref", "").endswith("ErrorBody"):
                examples = response["content"]["application/json"]["examples"]
                codes = {e["value"]["error_code"] for e in examples.values()}
                assert codes and codes <= {code for s, code in CATALOGUE.values() if s == int(status)}, (path, status)
                assert all(code in response["description"] for code in codes)


def test_response_headers_are_declared(tmp_path):
    spec = document(tmp_path, "iam")
    for path, _, operation in operations(spec):
        for status, response in operation["responses"].items():
            assert {"X-Request-Id", "X-Imagetag-Version", "X-Imagetag-Models"} <= set(response["headers"]), (
                path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (path, status)
    tagging = spec["paths"][TAGGING.replace("0123456789abcdef0123456789abcdef", "{project_id}")]["post"]["responses"]
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining"} <= tagging["200"]["headers"].keys()
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining"} <= tagging["429"]["headers"].keys()
    assert "X-Subject-Token" in spec["paths"]["/v3/auth/tokens"]["post"]["responses"]["201"]["headers"]


def test_tagging_paths_describe_binary_uploads(tmp_path):
    spec = document(tmp_path, "iam")
    for path in ("/v1.0/image/tagging", "/v2.0/image/tagging", "/v2/{project_id}/image/tagging"):
        one, batch = (spec["paths"][path + suffix]["post"] for suffix in ("", "/batch"))
        content = one["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data", "image/jpeg", "image/png", "image/bmp", "image/webp"}
        assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        query = {p["name"] for p in one["parameters"] if p["in"] == "query"}
        assert query == {"language", "threshold", "limit", "label_structure"}
        content = batch["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
        assert content["application/json"]["schema"]["properties"]["images"]["maxItems"] == 32
        assert batch["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("BatchTaggingResponse")


def test_every_body_has_examples_that_match_its_schema(tmp_path):
    spec = document(tmp_path, "iam")
    for path, method, operation in operations(spec):
        for where, content in media(operation):
            examples = [e["value"] for e in content.get("examples", {}).values()]
            examples += [content["example"]] if "example" in content else []
            assert examples, (path, method, where)
            validator = Draft202012Validator({**content["schema"], "components": spec["components"]})
            for example in examples:
                validator.validate(example)


CAT = photo_base64("cat_chelsea.jpg")
REQUESTS = {
    "iam": [
        ("post", TAGGING, {"json": {"image": CAT}}),
        ("post", TAGGING, {"json": {"image": CAT}, "headers": {"X-Auth-Token": "not-a-token"}}),
        ("post", "/v2.0/image/tagging", {"json": {"image": CAT}}),
        ("post", "/v3/auth/tokens", {"content": b"not json"}),
        ("post", "/v3/auth/tokens", {"json": {"auth": {}}}),
        ("delete", "/v3/auth/tokens", {}),
        ("get", "/v3/projects", {}),
        ("get", "/healthz", {}),
        ("get", "/readyz", {}),
    ],
    "none": [
        ("post", TAGGING, {"json": {"image": CAT, "language": "en"}}),
        ("post", "/v1.0/image/tagging", {"json": {"image": CAT, "colour": "red"}}),
        ("post", "/v2/not%20an%20id/image/tagging", {"json": {"image": CAT}}),
        ("post", "/v2.0/image/tagging", {"json": {"image": "bm90IGFuIGltYWdl"}}),
    ],
}


@pytest.mark.parametrize("auth_mode", REQUESTS)
def test_what_the_service_answers_is_what_the_document_says(tmp_path, auth_mode):
    """Real requests, good and bad: each status, error code and header they get is documented."""
    app = build_app(tmp_path, auth_mode=auth_mode)
    spec = app.openapi()
    sent = REQUESTS[auth_mode]

    async def main() -> list[httpx.Response]:
        async with serving(app) as client:
            return [await client.request(method, url, **kwargs) for method, url, kwargs in sent]

    responses = asyncio.run(main())
    assert {r.status_code for r in responses} == ({200, 400, 401} if auth_mode == "iam" else {200, 400})
    for (method, url, _), response in zip(sent, responses, strict=True):
        path = re.sub(r"^/v2/[^/]+/", "/v2/{project_id}/", url)
        documented = spec["paths"][path][method]["responses"][str(response.status_code)]
        assert {h.lower() for h in documented["headers"]} <= response.headers.keys(), (url, response.status_code)
        if response.status_code >= 400:
            codes = {e["value"]["error_code"] for e in documented["content"]["application/json"]["examples"].values()}
            assert response.json()["error_code"] in codes, (url, response.json())
