"""Measuring tag quality on labelled photos: precision, recall, calibration, and the fit of the
calibration itself. Used by `load-tests/fit_calibration.py`, `load-tests/quality_report.py` and
the quality tests, so that all three count the same way.

The labelled set is `tests/evalset/labels.tsv`: for every photo, the tags that are right (written
down by people before any model ran on it), the tags a person would expect first, and a split
drawn once at random: `fit` photos may be used to choose anything, `test` photos only to report.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.fusion import Calibration, Evidence, ScoredTag, fuse, gather, logit
from inference.vocabulary import Vocabulary

DEFAULT_THRESHOLD = 0.60
"""The contract's default `threshold` (60), as a probability."""
DEFAULT_LIMIT = 50
TOP = 5
SOURCES = ("classifier", "detector", "both")


@dataclass(frozen=True)
class LabelledPhoto:
    file: str
    path: Path
    split: str
    expected: frozenset[str]
    """Any of these in the top 5 is a hit."""
    right: frozenset[str]
    """Every right tag, with the ancestors each implies."""


def load_labels(path: Path, vocabulary: Vocabulary, split: str | None = None) -> list[LabelledPhoto]:
    photos_dir = path.parent / "photos"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    photos = []
    for row in rows:
        expected = _keys(row["expected"], vocabulary, row["file"])
        right = _keys(row["right"], vocabulary, row["file"]) | expected
        implied = {a for key in right for a in vocabulary.ancestors[key]}
        photo = LabelledPhoto(row["file"], photos_dir / row["file"], row["split"], expected, frozenset(right | implied))
        if split is None or photo.split == split:
            photos.append(photo)
    return photos


def _keys(text: str, vocabulary: Vocabulary, file: str) -> frozenset[str]:
    keys = frozenset(k for k in text.split(";") if k)
    unknown = keys - vocabulary.tags.keys()
    if unknown:
        raise ValueError(f"{file}: labels name tags the vocabulary lacks: {sorted(unknown)}")
    return keys


@dataclass(frozen=True)
class Observation:
    """One photo through the models: the raw evidence per tag and the tags the service returns."""

    photo: LabelledPhoto
    evidence: dict[str, Evidence]
    tags: list[ScoredTag]


def observe(engine, photos: Iterable[LabelledPhoto], calibration: Calibration | None = None) -> list[Observation]:
    """Runs the engine's own models and fusion on each photo, one at a time (as the CPU serves)."""
    calibration = calibration or engine.calibration
    observations = []
    for photo in photos:
        with Image.open(photo.path) as opened:
            image = opened.convert("RGB")
        (probabilities,) = engine.classifier.predict([image])
        (boxes,) = engine.detect([image])
        evidence, _ = gather(engine.vocabulary, probabilities, boxes, engine.detector_keys)
        tags = fuse(engine.vocabulary, probabilities, boxes, engine.detector_keys, calibration)
        observations.append(Observation(photo, evidence, tags))
    return observations


def returned(tags: list[ScoredTag], threshold: float = DEFAULT_THRESHOLD, limit: int = DEFAULT_LIMIT) -> list[ScoredTag]:
    """What a client gets: the contract compares the two-decimal percentage with the threshold."""
    return [t for t in tags if round(t.confidence * 100, 2) >= threshold * 100][:limit]


@dataclass(frozen=True)
class Reliability:
    bins: list[tuple[float, float, int, float, float]]
    """(low, high, count, mean confidence, share right) per confidence bin with any tags."""
    ece: float
    count: int


def reliability(pairs: list[tuple[float, bool]], bins: int = 10) -> Reliability:
    """Reliability table and expected calibration error (equal-width bins, weighted by count)."""
    table = []
    total = len(pairs)
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(c, r) for c, r in pairs if low <= c < high or (b == bins - 1 and c == 1.0)]
        if not inside:
            continue
        confidence = sum(c for c, _ in inside) / len(inside)
        accuracy = sum(r for _, r in inside) / len(inside)
        ece += len(inside) / total * abs(accuracy - confidence)
        table.append((low, high, len(inside), confidence, accuracy))
    return Reliability(table, ece if total else math.nan, total)


@dataclass(frozen=True)
class Quality:
    photos: int
    precision: float
    """Share of the tags returned at the default threshold that are right."""
    returned: int
    right_returned: int
    mean_returned_confidence: float
    """Beside `precision`: calibrated tags promise what they deliver at the threshold too."""
    recall_en: float
    """Share of photos with an expected tag among the top 5 English names."""
    recall_zh: float
    no_tag: float
    """Share of photos that get no tag at the default threshold."""
    calibration: dict[str, Reliability]
    """By evidence source, and `all`: every tag over the floor, as with threshold=0."""
    precision_by_source: dict[str, tuple[int, int]]
    """(right, returned) at the default threshold, by evidence source."""


def measure(observations: list[Observation], vocabulary: Vocabulary) -> Quality:
    right_returned = total_returned = hits_en = hits_zh = empty = 0
    returned_confidence = 0.0
    pairs: dict[str, list[tuple[float, bool]]] = {source: [] for source in (*SOURCES, "all")}
    by_source = {source: [0, 0] for source in SOURCES}
    expected_photos = 0
    for observation in observations:
        photo = observation.photo
        shown = returned(observation.tags)
        empty += not shown
        for tag in shown:
            is_right = tag.tag.key in photo.right
            right_returned += is_right
            total_returned += 1
            returned_confidence += tag.confidence
            counts = by_source[observation.evidence[tag.tag.key].source]
            counts[0] += is_right
            counts[1] += 1
        for tag in observation.tags:
            pair = (tag.confidence, tag.tag.key in photo.right)
            pairs["all"].append(pair)
            pairs[observation.evidence[tag.tag.key].source].append(pair)
        if photo.expected:
            expected_photos += 1
            top = observation.tags[:TOP]
            hits_en += bool({vocabulary.tags[k].en for k in photo.expected} & {t.tag.en for t in top})
            hits_zh += bool({vocabulary.tags[k].zh for k in photo.expected} & {t.tag.zh for t in top})
    return Quality(
        photos=len(observations),
        precision=right_returned / total_returned if total_returned else math.nan,
        returned=total_returned,
        right_returned=right_returned,
        mean_returned_confidence=returned_confidence / total_returned if total_returned else math.nan,
        recall_en=hits_en / expected_photos if expected_photos else math.nan,
        recall_zh=hits_zh / expected_photos if expected_photos else math.nan,
        no_tag=empty / len(observations) if observations else math.nan,
        calibration={source: reliability(p) for source, p in pairs.items()},
        precision_by_source={source: (c[0], c[1]) for source, c in by_source.items()},
    )


# ---- fitting ---------------------------------------------------------------------------------

SLOPES = {
    "classifier": ("classifier_slope",),
    "detector": ("detector_slope",),
    "both": ("classifier_slope", "detector_slope"),
}
OPTIONAL_TERMS = ("specific_shift", "rival_slope")
"""Terms the fit may add to every source's model; `load-tests/fit_calibration.py` keeps those
that cross-validation says help."""


def features(evidence: Evidence, names: tuple[str, ...]) -> list[float]:
    values = {
        "classifier_slope": logit(evidence.classifier) if evidence.classifier else 0.0,
        "detector_slope": logit(evidence.detector) if evidence.detector else 0.0,
        "rival_slope": evidence.rival,
        "specific_shift": float(evidence.specific),
    }
    return [values[name] for name in names]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> np.ndarray:
    """Weights (intercept first) of a logistic regression by Newton's method, with a small ridge
    so a feature that separates the few samples of a source perfectly cannot run off to infinity."""
    design = np.hstack([np.ones((len(x), 1)), x])
    weights = np.zeros(design.shape[1])
    ridge = l2 * np.eye(design.shape[1])
    ridge[0, 0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-design @ weights))
        gradient = design.T @ (p - y) + ridge @ weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(weights)), gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return weights


def fit_calibration(
    observations: list[Observation],
    terms: tuple[str, ...] = (),
    detector_upscale_small: bool = False,
    fitted_on: dict | None = None,
) -> Calibration:
    """One logistic model per evidence source, on every (photo, tag) pair either model supports,
    with the source's slopes and the optional `terms`."""
    models = {}
    for source, slopes in SLOPES.items():
        names = slopes + terms
        rows = [
            (features(e, names), key in o.photo.right)
            for o in observations
            for key, e in o.evidence.items()
            if e.source == source
        ]
        if not rows:
            raise ValueError(f"no {source} evidence in the fitting photos")
        x = np.array([r[0] for r in rows], dtype=float)
        y = np.array([r[1] for r in rows], dtype=float)
        weights = fit_logistic(x, y)
        models[source] = {"intercept": float(weights[0])} | {
            name: float(w) for name, w in zip(names, weights[1:])
        }
        models[source]["samples"] = len(rows)
        models[source]["right"] = int(y.sum())
    return Calibration(models, detector_upscale_small, fitted_on=fitted_on or {})


def log_losses(observations: list[Observation], calibration: Calibration) -> list[float]:
    """Negative log-likelihood of the right/wrong outcome of every supported tag."""
    losses = []
    for o in observations:
        for key, e in o.evidence.items():
            p = min(max(calibration.probability(e), 1e-6), 1 - 1e-6)
            losses.append(-math.log(p if key in o.photo.right else 1 - p))
    return losses
