"""Fusing classifier probabilities and detector boxes into one list of tags per image.

- A tag key is one tag whichever model saw it: ImageNet `banana` and COCO `banana` share a key.
- Evidence, per tag: the classifier's softmax mass of every ImageNet class at or below the tag in
  the hierarchy (`tabby cat` + `Persian cat` + ... for `cat`, exact for a softmax), and the
  detector's best box for the tag or any tag below it.
- Confidence: the probability that the tag is right, from a small logistic model per kind of
  evidence (classifier alone, detector alone, both) fitted on labelled photos that the quality
  report never scores (`tests/evalset`, fitting half; `load-tests/fit_calibration.py` writes
  `vocab/calibration.json`). So a confidence of 80 means that about 4 in 5 such tags are right.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inference.results import Box, Instance, ScoredTag
from inference.vocabulary import VOCAB_DIR, Vocabulary

CALIBRATION_FILE = VOCAB_DIR / "calibration.json"

# A class under 1% is noise, not evidence: summed over the ~400 animal classes, such crumbs alone
# would give every photo an "animal" score of 10-25%. A real dog photo puts its mass on a few
# breeds well above this, so the parent loses little.
_NEGLIGIBLE_PROBABILITY = 0.01
# Keeps logit() finite for a softmax of exactly 0 or 1.
_EPSILON = 1e-4


def logit(p: float) -> float:
    p = min(max(p, _EPSILON), 1.0 - _EPSILON)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@dataclass(frozen=True)
class Evidence:
    """What the models say about one tag in one image, before calibration."""

    classifier: float = 0.0
    """Softmax mass at or below the tag, 0..1."""
    detector: float = 0.0
    """Best raw box score for the tag or a tag below it, 0..1; 0 when no box."""
    rival: float = 0.0
    """The classifier's largest mass on a top-level tag unrelated to this one (a fruit, for a
    detector `person`): the contradiction the detector's evidence has to overcome."""
    specific: bool = False
    """The tag names one specific thing (a breed, a species), not a group of things: the models
    pick the nearest specific class even for a thing outside their vocabulary (a hedgehog comes
    back as a porcupine, a kangaroo as a wallaby), while its group (mammal) stays right."""

    @property
    def source(self) -> str:
        if self.classifier and self.detector:
            return "both"
        return "detector" if self.detector else "classifier"


@dataclass(frozen=True)
class Calibration:
    """Logistic models from evidence to the probability that a tag is right.

    logit p = intercept + classifier_slope * logit(classifier) + detector_slope * logit(detector)
              + rival_slope * rival + specific_shift * specific,
    with one set of coefficients per evidence source (a term the fit left out is zero). Fitted,
    never hand-set: see `load-tests/fit_calibration.py`.
    """

    models: dict[str, dict[str, float]]
    detector_upscale_small: bool = False
    """How the detector saw images smaller than its input when these models were fitted
    (enlarged, or padded at their own size): the scores mean what the fit says only that way."""
    floor: float = 0.005
    """Tags below this are dropped early, so a response for threshold=0 is bounded by the
    vocabulary, not by float dust."""
    fitted_on: dict[str, object] = field(default_factory=dict)
    """Provenance: which photos, how many pairs; documentation only."""

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> Calibration:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"]
        for source in ("classifier", "detector", "both"):
            if source not in models:
                raise ValueError(f"{path}: no calibration for {source!r} evidence")
        return cls(
            models, data["detector_upscale_small"], data.get("floor", 0.005), data.get("fitted_on", {})
        )

    def save(self, path: Path = CALIBRATION_FILE) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def probability(self, evidence: Evidence) -> float:
        model = self.models[evidence.source]
        z = model.get("intercept", 0.0) + model.get("rival_slope", 0.0) * evidence.rival
        if evidence.specific:
            z += model.get("specific_shift", 0.0)
        if evidence.classifier:
            z += model.get("classifier_slope", 0.0) * logit(evidence.classifier)
        if evidence.detector:
            z += model.get("detector_slope", 0.0) * logit(evidence.detector)
        return sigmoid(z)

    def box_probability(self, score: float, specific: bool) -> float:
        """A single box's confidence: the detector-alone model without context."""
        return self.probability(Evidence(detector=score, specific=specific))


def gather(
    vocabulary: Vocabulary,
    class_probabilities: np.ndarray,
    boxes: list[Box],
    detector_keys: dict[str, str],
) -> tuple[dict[str, Evidence], dict[str, list[Box]]]:
    """The evidence for every tag either model supports, and the boxes behind each tag."""
    classifier: dict[str, float] = defaultdict(float)
    for index in np.flatnonzero(class_probabilities >= _NEGLIGIBLE_PROBABILITY):
        key = vocabulary.imagenet[index]
        for tagged in (key, *vocabulary.ancestors[key]):
            classifier[tagged] += float(class_probabilities[index])

    boxes_by_key: dict[str, list[Box]] = defaultdict(list)
    detector: dict[str, float] = defaultdict(float)
    for box in boxes:
        key = detector_keys[box.class_name]
        boxes_by_key[key].append(box)
        for tagged in (key, *vocabulary.ancestors[key]):
            detector[tagged] = max(detector[tagged], box.confidence)

    root_mass = {key: min(mass, 1.0) for key, mass in classifier.items() if not vocabulary.tags[key].parents}
    evidence = {}
    for key in classifier.keys() | detector.keys():
        own_roots = {k for k in (key, *vocabulary.ancestors[key]) if not vocabulary.tags[k].parents}
        rival = max((mass for root, mass in root_mass.items() if root not in own_roots), default=0.0)
        evidence[key] = Evidence(
            min(classifier.get(key, 0.0), 1.0), detector.get(key, 0.0), rival, key not in vocabulary.general
        )
    return evidence, boxes_by_key


def fuse(
    vocabulary: Vocabulary,
    class_probabilities: np.ndarray,
    boxes: list[Box],
    detector_keys: dict[str, str],
    calibration: Calibration,
) -> list[ScoredTag]:
    """All tags of one image above the calibration floor, most confident first."""
    evidence, boxes_by_key = gather(vocabulary, class_probabilities, boxes, detector_keys)
    confidence = {key: calibration.probability(e) for key, e in evidence.items()}
    # A parent is right whenever a child is, so it is never less likely than its likeliest child.
    for key in list(confidence):
        for ancestor in vocabulary.ancestors[key]:
            confidence[ancestor] = max(confidence[ancestor], confidence[key])

    tags = []
    for key, value in confidence.items():
        if value < calibration.floor:
            continue
        found = sorted(
            (
                Instance(
                    calibration.box_probability(b.confidence, key not in vocabulary.general),
                    b.x,
                    b.y,
                    b.width,
                    b.height,
                )
                for b in boxes_by_key.get(key, ())
            ),
            key=lambda i: -i.confidence,
        )
        tags.append(ScoredTag(vocabulary.tags[key], value, tuple(found)))
    tags.sort(key=lambda t: (-t.confidence, t.tag.key))
    return tags
