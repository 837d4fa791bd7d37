"""The tagging use case on its own: what HTTP and `imagetag tag` share, with fake inference."""

from __future__ import annotations

import asyncio

import pytest

from inference.client import QueueFull
from inference.results import Instance, ModelError, ScoredTag, UndecodableImage
from inference.vocabulary import Vocabulary
from service.errors import CorruptImage, ModelFailed, Overloaded, UnsupportedImage
from service.protocol.tagging import TaggingOptions
from service.settings import Settings
from service.tagging import TaggingLimits, TaggingService, render
from tests.service import corpus
from tests.service.fakes import FakeInference

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
