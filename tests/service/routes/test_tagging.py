"""Successful tagging over real HTTP, on every path of the contract."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from tests.conftest import PHOTOS, photo_base64, ultralytics_asset
from tests.service import corpus

PATHS = ["/v2/0123456789abcdef0123456789abcdef/image/tagging", "/v2.0/image/tagging", "/v1.0/image/tagging"]


def tag(server, body, path=PATHS[0]):
    response = requests.post(server.url(path), json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"]
    return response.json()["result"]["tags"]


@pytest.mark.parametrize("path", PATHS)
def test_bus_photo_on_every_path(server, path):
    image = base64.b64encode(ultralytics_asset("bus.jpg").read_bytes()).decode()
    tags = {t["i18n_tag"]["en"]: t for t in tag(server, {"image": image}, path)}
    bus, person = tags["bus"], tags["person"]
    assert bus["tag"] == "公交车" and bus["i18n_tag"] == {"zh": "公交车", "en": "bus"}
    assert bus["type"] == "object"
    assert bus["i18n_type"] == {"zh": "交通工具", "en": "Vehicle"}
    assert person["i18n_type"] == {"zh": "人类", "en": "Human"}
    assert len(person["instances"]) >= 4
    for instance in person["instances"]:
        box = instance["bounding_box"]
        assert set(box) == {"top_left_x", "top_left_y", "width", "height"}
        assert all(isinstance(v, float | int) for v in box.values())
        assert isinstance(instance["confidence"], str)


def test_response_follows_the_contract(server):
    tags = tag(server, {"image": photo_base64("coffee.jpg"), "language": "en", "threshold": 0, "limit": 150})
    confidences = [float(t["confidence"]) for t in tags]
    assert confidences == sorted(confidences, reverse=True)
    for item in tags:
        assert set(item) == {"confidence", "type", "tag", "i18n_tag", "i18n_type", "instances"}
        assert item["type"] in {"object", "scene", "concept"}
        assert item["tag"] == item["i18n_tag"]["en"]
        whole, _, decimals = item["confidence"].partition(".")
        assert len(decimals) == 2 and 0 <= float(item["confidence"]) <= 100
        if item["type"] != "object":
            assert item["instances"] == []


def test_threshold_and_limit(server):
    body = {"image": photo_base64("bus.jpg"), "language": "en"}
    everything = tag(server, {**body, "threshold": 0, "limit": 150})
    assert len(everything) > 10
    default = tag(server, body)
    assert default == [t for t in everything if float(t["confidence"]) >= 60][:50]
    assert tag(server, {**body, "threshold": 0, "limit": 3}) == everything[:3]
    assert tag(server, {**body, "threshold": 100}) == []


def test_seed_example_body_with_empty_url_and_float_threshold(server):
    body = {"image": photo_base64("cat_chelsea.jpg"), "url": "", "language": "zh", "limit": 5, "threshold": 70.0}
    tags = tag(server, body, "/v2.0/image/tagging")
    assert "猫" in [t["tag"] for t in tags]
    assert len(tags) <= 5 and all(float(t["confidence"]) >= 70 for t in tags)


def test_url_input(server, files_server):
    tags = tag(server, {"url": f"{files_server}/dogs_spaniels.jpg", "language": "en"})
    assert "dog" in [t["tag"] for t in tags]


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "WEBP"])
def test_other_formats(server, image_format):
    buffer = io.BytesIO()
    Image.open(PHOTOS / "cat_chelsea.jpg").save(buffer, format=image_format)
    tags = tag(server, {"image": base64.b64encode(buffer.getvalue()).decode(), "language": "en"})
    assert "cat" in [t["tag"] for t in tags]


def test_boxes_follow_exif_orientation(server):
    # The bus photo stored sideways, with EXIF saying "rotate 90° clockwise to view": the boxes
    # must be in the upright picture's pixels, as a viewer shows it.
    upright = Image.open(ultralytics_asset("bus.jpg"))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    image = base64.b64encode(buffer.getvalue()).decode()
    tags = {t["i18n_tag"]["en"]: t for t in tag(server, {"image": image})}
    (bus,) = tags["bus"]["instances"]
    box = bus["bounding_box"]
    assert box["width"] > box["height"] * 0.8  # a sideways bus would be tall and narrow
    assert box["top_left_x"] + box["width"] <= upright.width + 1
    assert box["top_left_y"] + box["height"] <= upright.height + 1


def test_corrupt_pixels_behind_a_sound_header_are_refused_by_the_models_alone(server):
    """The gateway checks headers only; the models decode, and an image whose pixels do not
    decode gets the contract's AIS.0503 without failing the photos batched beside it."""
    bodies = [
        {"image": photo_base64("cat_chelsea.jpg"), "language": "en"},
        {"image": base64.b64encode(corpus.truncated_jpeg()).decode()},
        {"image": base64.b64encode(corpus.corrupt_png()).decode()},
        {"image": photo_base64("bus.jpg"), "language": "en"},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        cat, truncated, corrupt, bus = pool.map(
            lambda body: requests.post(server.url(PATHS[0]), json=body, timeout=60), bodies
        )
    for refused in (truncated, corrupt):
        assert refused.status_code == 400, refused.text
        assert refused.json()["error_code"] == "AIS.0503"
    assert "cat" in [t["tag"] for t in cat.json()["result"]["tags"]]
    assert "bus" in [t["tag"] for t in bus.json()["result"]["tags"]]


def test_auth_mode_none_warns_at_start(server):
    assert "IMAGETAG_AUTH_MODE=none: every request is accepted without credentials" in server.log.read_text()


def test_health_readiness_and_docs(server):
    assert requests.get(server.url("/healthz"), timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url("/readyz"), timeout=5).status_code == 200
    schema = requests.get(server.url("/openapi.json"), timeout=5).json()
    assert "/v2/{project_id}/image/tagging" in schema["paths"]
    operation = schema["paths"]["/v1.0/image/tagging"]["post"]
    assert "image" in json.dumps(operation["requestBody"])
    assert requests.get(server.url("/docs"), timeout=5).status_code == 200
