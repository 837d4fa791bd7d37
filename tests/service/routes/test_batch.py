"""Several images per call (`.../image/tagging/batch`) over real HTTP: real models on real photos
with bad images among them; the rules decided before the models (order, limits, slots, the one
call to the batcher) against the real app with a fake inference client."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from inference.results import ModelError
from tests.conftest import PHOTOS, photo_base64
from tests.service import corpus
from tests.service.fakes import FakeInference, gateway

PROJECT = "0123456789abcdef0123456789abcdef"
BATCH_PATHS = [f"/v2/{PROJECT}/image/tagging/batch", "/v2.0/image/tagging/batch", "/v1.0/image/tagging/batch"]


def batch(server, body, path=BATCH_PATHS[0], **kwargs) -> requests.Response:
    return requests.post(server.url(path), json=body, timeout=60, **kwargs)


def names(slot: dict) -> list[str]:
    return [t["tag"] for t in slot["result"]["tags"]]


@pytest.mark.parametrize("path", BATCH_PATHS)
def test_real_photos_are_tagged_in_request_order(server, path):
    body = {"images": [{"image": photo_base64(n)} for n in ("cat_chelsea.jpg", "bus.jpg", "dogs_spaniels.jpg")],
            "language": "en"}
    response = batch(server, body, path)
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] and response.headers["X-RateLimit-Remaining"]
    cat, bus, dogs = response.json()["results"]
    assert "cat" in names(cat) and "bus" in names(bus) and "dog" in names(dogs)
    assert "bus" not in names(cat) and "cat" not in names(bus)


def test_each_slot_is_what_the_single_image_path_answers(server):
    single = requests.post(server.url("/v1.0/image/tagging"), timeout=60,
                           json={"image": photo_base64("coffee.jpg"), "language": "en", "limit": 5, "threshold": 30})
    (slot,) = batch(server, {"images": [{"image": photo_base64("coffee.jpg")}], "language": "en", "limit": 5,
                             "threshold": 30}).json()["results"]
    assert slot.keys() == {"result"} and slot["result"]["tags"][0].keys() == single.json()["result"]["tags"][0].keys()
    assert names(slot) == [t["tag"] for t in single.json()["result"]["tags"]]


def test_bad_images_get_their_own_errors_beside_good_ones(server, files_server):
    small = corpus.photo_like(10, 10)
    images = [
        {"image": photo_base64("cat_chelsea.jpg")},
        {"image": "this is not base64!"},
        {"image": base64.b64encode(b"plain text, not an image").decode()},
        {"image": corpus.b64(small)},
        {"url": "http://169.254.169.254/latest/meta-data"},  # cloud metadata: never fetched
        {"url": f"{files_server}/notes.txt"},
        {"image": corpus.b64(corpus.truncated_jpeg())},  # a sound header: the models refuse its pixels
        {"url": f"{files_server}/dogs_spaniels.jpg"},
        {"url": f"{files_server}/missing.jpg"},
    ]
    response = batch(server, {"images": images, "language": "en"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    codes = [r.get("error_code") for r in results]
    assert codes == [None, "AIS.0501", "AIS.0502", "AIS.0504", "ModelArts.4601", "AIS.0502", "AIS.0503", None,
                     "ModelArts.4603"]
    assert all(r["error_msg"] and r.keys() == {"error_code", "error_msg"} for r in results if "error_code" in r)
    assert "cat" in names(results[0]) and "dog" in names(results[7])


@pytest.mark.parametrize(
    "body, code",
    [
        ({"images": []}, "AIS.0501"),
        ({"images": [{"image": photo_base64("cat_chelsea.jpg")}] * 33}, "AIS.0501"),
        ({"images": [{"image": "aGVsbG8=", "url": "http://x/y.jpg"}]}, "AIS.0501"),
        ({"images": [{"imgae": "aGVsbG8="}]}, "AIS.0012"),
        ({"image": "aGVsbG8="}, "AIS.0012"),
        ({"images": [{"image": "aGVsbG8="}], "limit": 0}, "AIS.0501"),
        ({"images": "aGVsbG8="}, "AIS.0501"),
    ],
)
def test_a_bad_call_is_refused_whole(tmp_path_factory, body, code):
    with gateway(tmp_path_factory.mktemp("bad")) as server:
        response = batch(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == code and response.json()["error_msg"]
    assert server.inference.images == []


class Recording(FakeInference):
    """Keeps each call's images apart."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[int] = []

    async def tag(self, images, deadline=None):
        self.calls.append(len(images))
        return await super().tag(images, deadline)


def test_the_batcher_sees_every_readable_image_at_once(tmp_path):
    photos = [(PHOTOS / n).read_bytes() for n in ("cat_chelsea.jpg", "bus.jpg", "coffee.jpg")]
    images = [{"image": corpus.b64(photos[0])}, {"image": "not base64!"}, {"image": corpus.b64(photos[1])},
              {"image": corpus.b64(b"text")}, {"image": corpus.b64(photos[2])}]
    with gateway(tmp_path, Recording()) as server:
        response = batch(server, {"images": images})
    assert response.status_code == 200
    assert server.inference.calls == [3]
    assert server.inference.images == photos  # as sent, in order


def test_thirty_two_images_pass_one_inference_slot(tmp_path):
    """A call holds one of the project's concurrency slots, however many images it has."""
    with gateway(tmp_path, Recording(delay_s=0.5), max_concurrent_per_project=1, rate_limit_burst=100) as server:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(batch, server, {"images": [{"image": photo_base64("cat_chelsea.jpg")}] * 32})
            # Not a fixed pause: on a busy machine the 32 images' parsing alone outlasted one.
            deadline = time.monotonic() + 10
            while not server.inference.calls:
                assert time.monotonic() < deadline, "the first call never reached the models"
                time.sleep(0.01)
            second = pool.submit(batch, server, {"images": [{"image": photo_base64("cat_chelsea.jpg")}]})
            first, second = first.result(), second.result()
    assert first.status_code == 200 and len(first.json()["results"]) == 32
    assert second.status_code == 429 and second.json()["error_code"] == "APIG.0308"  # the slot was held
    assert server.inference.calls == [32]


def test_rate_limits_count_images_not_calls(tmp_path):
    cat = {"image": photo_base64("cat_chelsea.jpg")}
    with gateway(tmp_path, rate_limit_per_s=0.001, rate_limit_burst=5) as server:
        four = batch(server, {"images": [cat] * 4})
        two = batch(server, {"images": [cat] * 2})
        one = requests.post(server.url(f"/v2/{PROJECT}/image/tagging"), json=cat, timeout=30)
        none_left = batch(server, {"images": [cat]})
    assert four.status_code == 200 and four.headers["X-RateLimit-Remaining"] == "1"
    assert two.status_code == 429 and two.json()["error_code"] == "APIG.0308" and two.headers["Retry-After"]
    assert one.status_code == 200 and one.headers["X-RateLimit-Remaining"] == "0"  # the refused call cost nothing
    assert none_left.status_code == 429
    assert len(server.inference.images) == 5


def test_credentials_are_asked_for_as_on_the_contract_paths(tmp_path):
    with gateway(tmp_path, auth_mode="iam") as server:
        missing = batch(server, {"images": [{"image": photo_base64("cat_chelsea.jpg")}]})
        wrong = batch(server, {"images": [{"image": "x"}]}, headers={"X-Auth-Token": "not-a-token"})
    assert missing.status_code == 401 and missing.json()["error_code"] == "ModelArts.4101"
    assert wrong.status_code == 401 and wrong.json()["error_code"] == "APIG.0301"
    assert server.inference.images == []


def test_models_not_ready_is_a_503_for_the_whole_call(tmp_path):
    with gateway(tmp_path, FakeInference(ready=False)) as server:
        response = batch(server, {"images": [{"image": photo_base64("cat_chelsea.jpg")}, {"image": "bad!"}]})
    assert response.status_code == 503 and response.json()["error_code"] == "AIS.0506"
    assert response.headers["Retry-After"]


class FailsOnTheSecond(Recording):
    async def tag(self, images, deadline=None):
        results = await super().tag(images, deadline)
        return [ModelError("the models failed on this image") if i == 1 else r for i, r in enumerate(results)]


def test_a_model_failure_is_that_images_alone(tmp_path):
    cat = {"image": photo_base64("cat_chelsea.jpg")}
    with gateway(tmp_path, FailsOnTheSecond()) as server:
        response = batch(server, {"images": [cat, cat, cat], "language": "en"})
    assert response.status_code == 200
    first, failed, third = response.json()["results"]
    assert failed == {"error_code": "AIS.0505", "error_msg": "the models failed on this image"}
    assert names(first) == names(third) == ["cat"]
