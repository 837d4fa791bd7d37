"""The tagging use case on its own: what HTTP and `imagetag tag` share, with fake inference."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from inference.client import QueueFull
from inference.results import Instance, ModelError, ScoredTag, UndecodableImage
from inference.vocabulary import Vocabulary
from service.errors import CorruptImage, ModelFailed, Overloaded, UnsupportedImage
from service.protocol.tagging import TaggingOptions
from service.settings import Settings
from service.tagging import TaggingLimits, TaggingService, render
from tests.conftest import photo_base64
from tests.service import corpus
from tests.service.fakes import FakeInference, gateway
from tests.service.test_url_fetch import TestServer, running

VOCABULARY = Vocabulary.load()
PNG = corpus.photo_like()


def scored(key: str, confidence: float, *instances: Instance) -> ScoredTag:
    return ScoredTag(VOCABULARY.tags[key], confidence, instances)


def test_render_applies_threshold_on_what_the_client_reads_then_limit_and_language():
    tags = [scored("cat", 0.99), scored("mammal", 0.6000001), scored("dog", 0.59994), scored("animal", 0.3)]
    shown = render(tags, language="zh", threshold=60, limit=50).result.tags
    assert [(t.tag, t.confidence) for t in shown] == [("猫", "99.00"), ("哺乳动物", "60.00")]  # not 59.99
    assert [t.i18n_tag.en for t in render(tags, language="en", threshold=0, limit=3).result.tags] == [
        "cat", "mammal", "dog"]


def test_render_rounds_boxes_to_two_decimals():
    (item,) = render([scored("cat", 0.9, Instance(0.8, 1.234, 2.345, 10.0001, 20.999))],
                     language="en", threshold=0, limit=1).result.tags
    box = item.instances[0].bounding_box
    assert (box.top_left_x, box.top_left_y, box.width, box.height) == (1.23, 2.35, 10.0, 21.0)
    assert item.instances[0].confidence == "80.00"


class Scripted(FakeInference):
    def __init__(self, outcome) -> None:
        super().__init__()
        self.outcome = outcome

    async def tag(self, images, deadline=None):
        if isinstance(self.outcome, Exception) and not isinstance(self.outcome, ModelError):
            raise self.outcome
        return [self.outcome for _ in images]


def service(inference) -> TaggingService:
    return TaggingService(inference, TaggingLimits.from_settings(Settings()))


@pytest.mark.parametrize(
    "inference, error",
    [
        (FakeInference(ready=False), Overloaded),
        (Scripted(QueueFull("full")), Overloaded),
        (Scripted(ModelError("boom")), ModelFailed),
        (Scripted(UndecodableImage("truncated")), CorruptImage),
    ],
)
def test_inference_failures_become_catalogue_errors(inference, error):
    with pytest.raises(error):
        asyncio.run(service(inference).tag_bytes(PNG, TaggingOptions()))


def test_bad_bytes_never_reach_the_models():
    inference = FakeInference()
    with pytest.raises(UnsupportedImage):
        asyncio.run(service(inference).tag_bytes(b"plain text", TaggingOptions()))
    assert inference.images == []


def test_bytes_are_tagged_under_the_options_and_reach_the_models_as_sent():
    inference = FakeInference()
    response = asyncio.run(service(inference).tag_bytes(PNG, TaggingOptions(language="en", limit=1)))
    assert [t.tag for t in response.result.tags] == ["cat"]
    assert inference.images == [PNG]


def test_stalled_downloads_leave_the_project_its_inference_slots(tmp_path):
    """Over HTTP: ten `url`s whose server never answers, then ten base64 images of the same project."""
    with running(TestServer()) as stalling, gateway(
        tmp_path, FakeInference(delay_s=0.2), url_allowed_networks=["127.0.0.1/32"], url_timeout_s=4,
        rate_limit_per_s=1000, rate_limit_burst=1000,  # the concurrency caps at their defaults: 10, 5 downloads
    ) as server:

        def post(body: dict) -> requests.Response:
            return requests.post(server.url("/v1.0/image/tagging"), json=body, timeout=30)

        with ThreadPoolExecutor(20) as pool:
            downloads = [pool.submit(post, {"url": stalling.url("/slow-headers")}) for _ in range(10)]
            time.sleep(0.5)
            started = time.monotonic()
            tagged = list(pool.map(post, [{"image": photo_base64("cat_chelsea.jpg")}] * 10))
            assert time.monotonic() - started < 3.5  # before any download gave up
            stalled = [future.result() for future in downloads]
    assert [r.status_code for r in tagged] == [200] * 10
    refused = [r for r in stalled if r.status_code == 429]
    assert len(refused) == 5 and refused[0].json()["error_code"] == "APIG.0308"  # downloads' own budget
    timed_out = [r.json() for r in stalled if r.status_code == 400]
    assert len(timed_out) == 5
    assert all(e["error_code"] == "ModelArts.4603" and "timed out after 4 s" in e["error_msg"] for e in timed_out)
