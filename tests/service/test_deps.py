"""The route dependencies: the body under its cap, the project in the path, the request handed to
the authenticator, and admission keyed by project. The real app over ASGI, models replaced."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.requests import Request

from service.deps import ReceivedBody, incoming, json_object, request_body
from service.errors import InvalidJson, InvalidParameter
from tests.conftest import photo_base64
from tests.service.fakes import build_app, serving

PROJECT = "0123456789abcdef0123456789abcdef"
CAT = photo_base64("cat_chelsea.jpg")


def post_all(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with serving(app) as client:
            return [await client.post(path, **kwargs) for path, kwargs in requests]

    return asyncio.run(main())


async def chunks(size: int, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b" " * size


def test_a_body_over_the_cap_is_refused_whether_declared_or_streamed(tmp_path):
    limit = 1000
    declared = httpx.Headers({"Content-Length": str(limit + 1)})
    at_the_cap, declared_over, streamed_over = post_all(build_app(tmp_path, max_body_bytes=limit), [
        ("/v1.0/image/tagging", {"content": b"[" + b" " * (limit - 2) + b"]"}),
        ("/v1.0/image/tagging", {"content": b" " * (limit + 1), "headers": declared}),
        # No Content-Length: the body is counted as it arrives.
        ("/v1.0/image/tagging", {"content": chunks(100, 11)}),
    ])
    assert at_the_cap.json()["error_code"] == "AIS.0014"  # read whole, then judged as JSON
    for response in (declared_over, streamed_over):
        assert (response.status_code, response.json()["error_code"]) == (413, "APIG.0201")


def test_the_documented_parameters_are_the_contract_s(tmp_path):
    schema = build_app(tmp_path).openapi()["paths"]
    # No query parameter from the body dependency's keyword arguments: only the options, which a
    # raw image body takes as query parameters; the project header is service/openapi.py's, for
    # paths without a project id.
    assert [p["name"] for p in schema["/v1.0/image/tagging"]["post"]["parameters"]] == [
        "language", "threshold", "limit", "label_structure", "X-Project-Id"]
    assert [p["name"] for p in schema["/v1.0/image/tagging/batch"]["post"]["parameters"]] == ["X-Project-Id"]
    assert [p["name"] for p in schema["/v3/auth/tokens"]["post"]["parameters"]] == ["nocatalog"]


def test_sdk_without_project_id_is_told_so(tmp_path):
    (response,) = post_all(build_app(tmp_path), [("/v2/%7Bproject_id%7D/image/tagging", {"json": {"image": CAT}})])
    assert (response.status_code, response.json()["error_code"]) == (400, "AIS.0501")
    assert "project id" in response.json()["error_msg"]


@pytest.mark.parametrize("project_id", ["not.a.project", "x" * 65, "%C3%A9t%C3%A9"])
def test_a_path_project_id_must_look_like_one(tmp_path, project_id):
    (refused,) = post_all(build_app(tmp_path), [(f"/v2/{project_id}/image/tagging", {"json": {"image": CAT}})])
    assert (refused.status_code, refused.json()["error_code"]) == (400, "AIS.0501")
    assert "is not a valid project id" in refused.json()["error_msg"]


def test_admission_is_per_path_project_and_anonymous_without_one(tmp_path):
    app = build_app(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=1)
    body = {"json": {"image": CAT}}
    first, again, other, anonymous, anonymous_again = post_all(app, [
        (f"/v2/{PROJECT}/image/tagging", body),
        (f"/v2/{PROJECT}/image/tagging", body),
        (f"/v2/{'f' * 32}/image/tagging", body),
        ("/v1.0/image/tagging", body),
        ("/v2.0/image/tagging", body),
    ])
    assert first.status_code == 200 and first.headers["X-RateLimit-Limit"] == "1"
    assert first.headers["X-RateLimit-Remaining"] == "0"
    assert again.status_code == 429
    assert other.status_code == 200 and anonymous.status_code == 200
    assert anonymous_again.status_code == 429


def test_the_authenticator_gets_the_request_as_sent(tmp_path):
    chunks = [b'{"image": ', b'"aGVsbG8=", "limit": 5}']

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    request = Request({
        "type": "http", "method": "POST", "path": "/v2/p/a b", "raw_path": b"/v2/p/a%20b", "query_string": b"b=2&a=1",
        "headers": [(b"host", b"example.com"), (b"x-twice", b"first"), (b"x-twice", b"second")],
        "client": ("192.0.2.7", 40000), "app": build_app(tmp_path),
    }, receive)
    seen = incoming(request)
    assert (seen.method, seen.raw_path, seen.query) == ("POST", "/v2/p/a%20b", "b=2&a=1")
    assert seen.headers == {"host": "example.com", "x-twice": "first"}
    assert seen.client_host == "192.0.2.7"
    # Hashed as it streams in, and read once: the route gets the same bytes afterwards.
    assert asyncio.run(seen.body_sha256()) == hashlib.sha256(b'{"image": "aGVsbG8=", "limit": 5}').hexdigest()
    received = asyncio.run(request_body(request))
    assert (received.data, received.json_commas) == (b'{"image": "aGVsbG8=", "limit": 5}', 1)
    assert incoming(Request({**request.scope, "client": None})).client_host is None


@pytest.mark.parametrize(
    "body, message",
    [(b"{", "not valid JSON"), (b"\xff", "not valid JSON"),
     (b"[]", "must be a JSON object"), (b"null", "must be a JSON object")],
)
def test_only_a_json_object_is_a_body(body, message):
    with pytest.raises(InvalidJson, match=message):
        json_object(ReceivedBody.of(body))
    assert json_object(ReceivedBody.of(b'{"image": "x"}')) == {"image": "x"}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE_JSON = {
    "a 100,000-deep array": (nested(100_000), InvalidJson, "nested too deeply"),
    "a 50,000-deep image": (b'{"image": ' + nested(50_000) + b"}", InvalidJson, "nested too deeply"),
    "4 million empty arrays": (b"[" + b"[]," * 3_999_999 + b"[]]", InvalidJson, "3999999 commas"),
    "deeper than the parser goes": (nested(5_000), InvalidJson, "nested too deeply"),
    "a limit of 5,000 digits": (b'{"limit": ' + b"9" * 5_000 + b"}", InvalidParameter, "5000 characters"),
    "a threshold of 1 MB of digits": (b'{"threshold": 1.' + b"5" * 1_000_000 + b"}", InvalidParameter, "long"),
}


@pytest.mark.parametrize("body, error, message", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_is_refused_with_the_contract_code(body, error, message):
    with pytest.raises(error, match=message):
        json_object(ReceivedBody.of(body))


def test_what_a_request_holds_is_within_the_bounds():
    request = b'{"image": "x", "threshold": 30.0, "limit": 150, "language": "en", "url": null}'
    assert json_object(ReceivedBody.of(request))["limit"] == 150
    assert json_object(ReceivedBody.of(b'{"a": ' + nested(900) + b"}"))["a"]  # deep, within the parser's reach
    assert json_object(ReceivedBody.of(b'{"url": "http://a/' + b"," * 9_990 + b'"}'))  # inside strings count too


def test_every_route_and_dependency_runs_on_the_event_loop(tmp_path):
    # A plain `def` would run on FastAPI's thread pool: a thread hop per request, paid by every
    # gateway at GPU rates.
    def api_routes(routes):
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            # FastAPI 0.165 keeps an included router whole, behind a wrapper
            included = getattr(route, "original_router", None)
            if included is not None:
                yield from api_routes(included.routes)

    def calls(dependant):
        yield dependant.call
        for dependency in dependant.dependencies:
            yield from calls(dependency)

    routes = list(api_routes(build_app(tmp_path).routes))
    assert {"/v2/{project_id}/image/tagging", "/v3/auth/tokens", "/metrics"} <= {route.path for route in routes}
    on_threads = {
        f"{route.path}: {call.__qualname__}"
        for route in routes
        for call in calls(route.dependant)
        if not inspect.iscoroutinefunction(call)
    }
    assert not on_threads
