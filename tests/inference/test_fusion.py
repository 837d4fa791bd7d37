import numpy as np
import pytest

from inference.detector import Box
from inference.fusion import Calibration, Evidence, fuse, gather, sigmoid
from inference.vocabulary import Vocabulary

DETECTOR_KEYS = {"cat": "cat", "person": "person", "banana": "banana"}
# Hand-set coefficients keep the arithmetic visible; the shipped ones are fitted (test_quality).
SIMPLE = Calibration(
    {
        "classifier": {"classifier_slope": 1.0},
        "detector": {"detector_slope": 1.0, "specific_shift": -1.0},
        "both": {"classifier_slope": 1.0, "detector_slope": 1.0},
    }
)


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


def test_parent_evidence_is_its_childrens_probability_mass(vocabulary):
    # tabby 281, tiger cat 282, Egyptian cat 285
    evidence, _ = gather(vocabulary, probabilities(i281=0.3, i282=0.25, i285=0.2), [], DETECTOR_KEYS)
    assert evidence["cat"].classifier == pytest.approx(0.75, abs=1e-6)
    assert evidence["animal"].classifier == pytest.approx(0.75, abs=1e-6)
    assert evidence[vocabulary.imagenet[281]].classifier == pytest.approx(0.3, abs=1e-6)
    assert evidence["cat"].source == "classifier"
    assert evidence[vocabulary.imagenet[281]].specific and not evidence["cat"].specific


def test_classifier_crumbs_under_one_percent_are_not_evidence(vocabulary):
    crumbs = {f"i{i}": 0.009 for i in range(151, 200)}  # 49 dog breeds at 0.9% each
    evidence, _ = gather(vocabulary, probabilities(**crumbs), [], DETECTOR_KEYS)
    assert "dog" not in evidence


def test_confidence_is_the_calibrated_probability_of_the_evidence(vocabulary):
    tags = by_key(fuse(vocabulary, probabilities(i281=0.3, i282=0.25, i285=0.2), [], DETECTOR_KEYS, SIMPLE))
    # logit(0.3) with slope 1 and no intercept gives back 0.3
    assert tags[vocabulary.imagenet[281]].confidence == pytest.approx(0.3, abs=1e-6)
    assert tags["cat"].confidence == pytest.approx(0.75, abs=1e-6)


def test_both_models_seeing_one_thing_make_one_tag_with_boxes(vocabulary):
    box = Box(0.5, 10, 20, 30, 40, class_name="banana")
    tags = fuse(vocabulary, probabilities(i954=0.6), [box], DETECTOR_KEYS, SIMPLE)
    bananas = [t for t in tags if t.tag.key == "banana"]
    assert len(bananas) == 1
    # "both": logit(0.6) + logit(0.5) = logit(0.6)
    assert bananas[0].confidence == pytest.approx(0.6, abs=1e-6)
    assert [(i.x, i.y, i.width, i.height) for i in bananas[0].instances] == [(10, 20, 30, 40)]
    # the box's own confidence is the detector-alone model: sigmoid(logit(0.5) - 1)
    assert bananas[0].instances[0].confidence == pytest.approx(sigmoid(-1.0), abs=1e-6)
    fruit = by_key(tags)["fruit"]
    assert fruit.instances == ()
    assert fruit.confidence >= bananas[0].confidence - 1e-9


def test_a_parent_is_never_less_confident_than_its_child(vocabulary):
    # The specific-tag shift makes "banana" from a box less likely than the box score, and
    # "fruit" (general, no shift) more; a more general tag must not fall below its child anyway.
    calibration = Calibration(
        {
            "classifier": {"classifier_slope": 1.0},
            "detector": {"detector_slope": 1.0, "specific_shift": 2.0, "intercept": -1.0},
            "both": {"classifier_slope": 1.0, "detector_slope": 1.0},
        }
    )
    banana = Box(0.5, 0, 0, 9, 9, class_name="banana")
    tags = by_key(fuse(vocabulary, probabilities(), [banana], DETECTOR_KEYS, calibration))
    assert tags["banana"].confidence == pytest.approx(sigmoid(1.0), abs=1e-6)
    assert tags["fruit"].confidence == tags["banana"].confidence
    assert tags["food"].confidence == tags["banana"].confidence


def test_sorted_most_confident_first_and_floor_applied(vocabulary):
    boxes = [Box(0.9, 0, 0, 5, 5, class_name="person"), Box(0.3, 1, 1, 5, 5, class_name="person")]
    tags = fuse(vocabulary, probabilities(i281=0.011), boxes, DETECTOR_KEYS, SIMPLE)
    confidences = [t.confidence for t in tags]
    assert confidences == sorted(confidences, reverse=True)
    assert tags[0].tag.key == "person"
    # "person" is general (ImageNet's groom and scuba diver are people), so no specific shift
    assert [round(i.confidence, 3) for i in tags[0].instances] == [0.9, 0.3]
    floored = Calibration(SIMPLE.models, floor=0.05)
    assert vocabulary.imagenet[281] not in by_key(fuse(vocabulary, probabilities(i281=0.011), boxes, DETECTOR_KEYS, floored))
    assert all(t.confidence >= floored.floor for t in fuse(vocabulary, probabilities(i281=0.011), boxes, DETECTOR_KEYS, floored))


def test_rival_is_the_classifiers_belief_in_something_unrelated(vocabulary):
    # A detector "person" on a photo the classifier calls a banana (954) and, a little, a cat.
    person = Box(0.5, 0, 0, 9, 9, class_name="person")
    evidence, _ = gather(vocabulary, probabilities(i954=0.8, i281=0.1), [person], DETECTOR_KEYS)
    assert evidence["person"].rival == pytest.approx(0.8, abs=1e-6)
    # The banana's own root (food) is not its rival; the cat's (animal) is.
    assert evidence["banana"].rival == pytest.approx(0.1, abs=1e-6)


def test_the_shipped_calibration_loads_and_rises_with_the_evidence():
    calibration = Calibration.load()
    for source in ("classifier", "detector", "both"):
        assert calibration.models[source]["samples"] > 0
    weak, strong = Evidence(classifier=0.2), Evidence(classifier=0.9)
    assert calibration.probability(weak) < calibration.probability(strong)
    weak, strong = Evidence(detector=0.3), Evidence(detector=0.9)
    assert calibration.probability(weak) < calibration.probability(strong)
    assert calibration.probability(Evidence(classifier=0.5, detector=0.8)) > calibration.probability(Evidence(classifier=0.5))


def test_calibration_round_trips_through_its_file(tmp_path):
    path = tmp_path / "calibration.json"
    SIMPLE.save(path)
    assert Calibration.load(path) == SIMPLE
