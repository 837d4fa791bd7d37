import numpy as np
import pytest

from inference.detector import Box
from inference.fusion import Calibration, fuse
from inference.vocabulary import Vocabulary

DETECTOR_KEYS = {"cat": "cat", "person": "person", "banana": "banana"}


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def probabilities(**by_index: float) -> np.ndarray:
    p = np.zeros(1000, dtype=np.float32)
    for index, value in by_index.items():
        p[int(index.removeprefix("i"))] = value
    return p


def by_key(tags):
    return {t.tag.key: t for t in tags}


def test_parent_collects_its_childrens_probability(vocabulary):
    # tabby 281, tiger cat 282, Egyptian cat 285
    tags = by_key(fuse(vocabulary, probabilities(i281=0.3, i282=0.25, i285=0.2), [], DETECTOR_KEYS))
    assert tags["cat"].confidence == pytest.approx(0.75, abs=1e-6)
    assert tags["animal"].confidence == pytest.approx(0.75, abs=1e-6)
    assert tags[vocabulary.imagenet[281]].confidence == pytest.approx(0.3, abs=1e-6)


def test_both_models_seeing_one_thing_make_one_tag_with_boxes(vocabulary):
    box = Box("banana", 0.5, 10, 20, 30, 40)
    tags = fuse(vocabulary, probabilities(i954=0.6), [box], DETECTOR_KEYS)
    bananas = [t for t in tags if t.tag.key == "banana"]
    assert len(bananas) == 1
    detector = 0.5 ** Calibration().detector_exponent
    assert bananas[0].confidence == pytest.approx(1 - (1 - 0.6) * (1 - detector), abs=1e-6)
    assert [(i.x, i.y, i.width, i.height) for i in bananas[0].instances] == [(10, 20, 30, 40)]
    fruit = by_key(tags)["fruit"]
    assert fruit.instances == ()
    assert fruit.confidence >= bananas[0].confidence - 1e-9


def test_sorted_most_confident_first_and_floor_applied(vocabulary):
    boxes = [Box("person", 0.9, 0, 0, 5, 5), Box("person", 0.3, 1, 1, 5, 5)]
    tags = fuse(vocabulary, probabilities(i281=0.001), boxes, DETECTOR_KEYS)
    confidences = [t.confidence for t in tags]
    assert confidences == sorted(confidences, reverse=True)
    assert tags[0].tag.key == "person"
    assert [round(i.confidence, 3) for i in tags[0].instances] == [round(0.9**0.6, 3), round(0.3**0.6, 3)]
    assert all(t.confidence >= Calibration().floor for t in tags)
    assert vocabulary.imagenet[281] not in by_key(tags)  # 0.001 is under the floor
