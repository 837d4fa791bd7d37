"""The application around the built parts: the error handlers and the request id.

The real app from `create_app`, over ASGI with its lifespan running; models replaced by fakes. A
few routes are added here to raise what no real route raises on demand. The lifespan's loading in
the background shows in `routes/test_health.py`.
"""

from __future__ import annotations

import asyncio

import httpx
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.exceptions import HTTPException

from service.app import REQUEST_ID_HEADER
from tests.conftest import photo_base64
from tests.service.fakes import FakeInference, build_app, serving

TAGGING = "/v2/0123456789abcdef0123456789abcdef/image/tagging"


class Broken(FakeInference):
    async def tag(self, images, deadline=None):
        raise RuntimeError("a bug")


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "error_msg"} and body["error_code"] == code, body
    return body


def test_leaving_the_lifespan_closes_the_inference_client(tmp_path):
    closed = []

    class Closing(FakeInference):
        async def close(self) -> None:
            closed.append(True)

    async def main() -> None:
        async with serving(build_app(tmp_path, Closing())) as client:
            assert (await client.get("/readyz")).status_code == 200
            assert closed == []

    asyncio.run(main())
    assert closed == [True]


def test_every_response_has_a_request_id_of_its_own(tmp_path):
    async def main() -> list[httpx.Response]:
        async with serving(build_app(tmp_path, FakeInference())) as client:
            return [await client.get("/healthz"), await client.get("/healthz"), await client.get("/nothing")]

    ids = [response.headers[REQUEST_ID_HEADER] for response in asyncio.run(main())]
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_an_escaped_exception_is_the_contract_500_naming_its_request_id(tmp_path):
    async def main() -> httpx.Response:
        async with serving(build_app(tmp_path, Broken())) as client:
            return await client.post(TAGGING, json={"image": photo_base64("cat_chelsea.jpg")})

    response = asyncio.run(main())
    body = assert_envelope(response, 500, "AIS.0506")
    assert response.headers[REQUEST_ID_HEADER] in body["error_msg"]
    assert "a bug" not in body["error_msg"]


def test_framework_and_redis_errors_get_the_one_envelope(tmp_path):
    app = build_app(tmp_path, FakeInference())

    async def teapot() -> None:
        raise HTTPException(418, "short and stout")

    async def number(n: int) -> dict[str, int]:
        return {"n": n}

    async def store_down() -> None:
        raise RedisConnectionError("connection refused")

    app.add_api_route("/test/teapot", teapot)
    app.add_api_route("/test/number", number)
    app.add_api_route("/test/store", store_down)

    async def main() -> dict[str, httpx.Response]:
        async with serving(app) as client:
            return {
                "wrong method": await client.post("/healthz"),
                "teapot": await client.get("/test/teapot"),
                "not a number": await client.get("/test/number", params={"n": "many"}),
                "store down": await client.get("/test/store"),
            }

    responses = asyncio.run(main())
    assert "POST /healthz" in assert_envelope(responses["wrong method"], 404, "APIG.0101")["error_msg"]
    assert "short and stout" not in assert_envelope(responses["teapot"], 500, "AIS.0506")["error_msg"]
    assert assert_envelope(responses["not a number"], 400, "AIS.0501")["error_msg"].startswith("query.n: ")
    assert assert_envelope(responses["store down"], 503, "AIS.0506")
    assert app.state.metrics.registry.get_sample_value("imagetag_redis_errors_total") == 1  # for the alert
    assert responses["store down"].headers["Retry-After"] == "1"
