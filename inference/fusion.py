"""Fusing classifier probabilities and detector boxes into one list of tags per image.

- A tag key is one tag whichever model saw it: ImageNet `banana` and COCO `banana` share a key.
- Classifier: a tag's probability is the softmax mass of every ImageNet class at or below it in
  the hierarchy (`tabby cat` + `Persian cat` + ... for `cat`), which is exact for a softmax.
- Detector: a tag's score is its best box; a parent takes the best score of its children.
- Scores are calibrated onto 0..1 so that the contract's default threshold (60) keeps what a
  person would tag; classifier and detector evidence combine as independent signals
  (noisy-OR: 1 - (1 - c)(1 - d)).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from inference.detector import Box
from inference.vocabulary import Tag, Vocabulary


# A class under 1% is noise, not evidence: summed over the ~400 animal classes, such crumbs alone
# would give every photo an "animal" score of 10-25%. A real dog photo puts its mass on a few
# breeds well above this, so the parent loses little.
_NEGLIGIBLE_PROBABILITY = 0.01


@dataclass(frozen=True)
class Calibration:
    # YOLO scores run low: a clearly visible object often scores 0.5-0.7. Raising to a power
    # below one lifts them onto the same scale as the classifier's probabilities
    # (0.5 -> 0.66, 0.7 -> 0.81, 0.9 -> 0.94) while keeping their order.
    detector_exponent: float = 0.6
    classifier_exponent: float = 1.0
    # Tags below this are noise at any threshold a client could mean; dropping them early keeps
    # responses for threshold=0 bounded by the vocabulary, not by float dust.
    floor: float = 0.005


@dataclass(frozen=True)
class Instance:
    confidence: float
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class ScoredTag:
    tag: Tag
    confidence: float
    """Calibrated, 0..1."""
    instances: tuple[Instance, ...] = ()


def fuse(
    vocabulary: Vocabulary,
    class_probabilities: np.ndarray,
    boxes: list[Box],
    detector_keys: dict[str, str],
    calibration: Calibration = Calibration(),
) -> list[ScoredTag]:
    """All tags of one image above the calibration floor, most confident first."""
    classifier_scores: dict[str, float] = defaultdict(float)
    for index in np.flatnonzero(class_probabilities >= _NEGLIGIBLE_PROBABILITY):
        key = vocabulary.imagenet[index]
        probability = float(class_probabilities[index])
        for tagged in (key, *vocabulary.ancestors[key]):
            classifier_scores[tagged] += probability

    instances: dict[str, list[Instance]] = defaultdict(list)
    detector_scores: dict[str, float] = defaultdict(float)
    for box in boxes:
        key = detector_keys[box.class_name]
        confidence = box.confidence**calibration.detector_exponent
        instances[key].append(Instance(confidence, box.x, box.y, box.width, box.height))
        for tagged in (key, *vocabulary.ancestors[key]):
            detector_scores[tagged] = max(detector_scores[tagged], confidence)

    tags = []
    for key in classifier_scores.keys() | detector_scores.keys():
        classifier = min(classifier_scores.get(key, 0.0), 1.0) ** calibration.classifier_exponent
        detector = detector_scores.get(key, 0.0)
        confidence = 1.0 - (1.0 - classifier) * (1.0 - detector)
        if confidence >= calibration.floor:
            found = sorted(instances.get(key, ()), key=lambda i: -i.confidence)
            tags.append(ScoredTag(vocabulary.tags[key], confidence, tuple(found)))
    tags.sort(key=lambda t: (-t.confidence, t.tag.key))
    return tags
