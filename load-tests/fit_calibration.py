"""Fits the confidence calibration on the fitting half of the labelled photos, and only there.

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/fit_calibration.py

Chooses, by 5-fold cross-validation over the fitting photos (the test half is never read), the
form with the lowest held-out log-loss among:
- the detector seeing an image smaller than its input enlarged (ultralytics' default) or padded
  at its own size;
- with or without a shift for specific tags (a breed, a species: `specific_shift`);
- with or without discounting evidence by the classifier's confidence in something unrelated
  (a detector "person" in a photo the classifier calls a fruit: `rival_slope`).
Then fits the chosen form on all fitting photos and writes `inference/vocab/calibration.json`.
Prints what each choice measured, so the choice can be checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import random
import sys
from pathlib import Path

from inference.engine import TaggingEngine
from inference.evaluation import (
    DEFAULT_THRESHOLD,
    OPTIONAL_TERMS,
    fit_calibration,
    load_labels,
    log_losses,
    observe,
)
from inference.fusion import CALIBRATION_FILE, Calibration
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO / "tests" / "evalset" / "labels.tsv"
FOLDS = 5
# Any calibration will do to build the engine: the fit reads the raw evidence, not confidences.
_PROVISIONAL = Calibration(
    {source: {"classifier_slope": 1.0, "detector_slope": 1.0} for source in ("classifier", "detector", "both")}
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    args = parser.parse_args()

    settings = Settings()
    config = settings.engine_config()
    engine = TaggingEngine.build(dataclasses.replace(config, calibration=_PROVISIONAL))
    photos = load_labels(LABELS, engine.vocabulary, split="fit")
    folds = _folds([p.file for p in photos])
    print(f"{len(photos)} fitting photos, {FOLDS}-fold cross-validation by photo\n")
    print("| detector on small images | extra terms | CV log-loss | CV precision at 60 |")
    print("|---|---|---|---|")
    term_sets = [c for n in range(len(OPTIONAL_TERMS) + 1) for c in itertools.combinations(OPTIONAL_TERMS, n)]
    candidates = []
    for upscale in (True, False):
        for detector in engine.detectors:
            detector.upscale_small = upscale
        observations = observe(engine, photos, _PROVISIONAL)
        for terms in term_sets:
            loss, right, shown = _cross_validate(observations, folds, terms)
            print(
                f"| {'enlarged' if upscale else 'padded'} | {', '.join(terms) or 'none'} | {loss:.4f} "
                f"| {right / shown:.3f} ({right}/{shown}) |"
            )
            candidates.append((loss, upscale, terms, observations))

    loss, upscale, terms, observations = min(candidates, key=lambda c: c[0])
    calibration = fit_calibration(
        observations,
        terms,
        upscale,
        fitted_on={
            "labels": "tests/evalset/labels.tsv",
            "labels_sha256": hashlib.sha256(LABELS.read_bytes()).hexdigest(),
            "split": "fit",
            "photos": len(photos),
            "detector": ", ".join(w.name for w in settings.detector_weights),
            "command": "load-tests/fit_calibration.py",
            "cross_validated_log_loss": round(loss, 4),
        },
    )
    calibration.save(args.out)
    print(
        f"\nChosen: small images {'enlarged' if upscale else 'padded'}, extra terms "
        f"{', '.join(terms) or 'none'}; written to {args.out}"
    )
    return 0


def _folds(files: list[str]) -> list[set[str]]:
    order = sorted(files)
    random.Random(8).shuffle(order)
    return [set(order[i::FOLDS]) for i in range(FOLDS)]


def _cross_validate(observations, folds, terms: tuple[str, ...]) -> tuple[float, int, int]:
    """Held-out log-loss per tag, and precision at the default threshold of each tag's own
    calibrated probability (before fusion lifts parents to their likeliest child)."""
    losses = []
    right = shown = 0
    for held_out in folds:
        train = [o for o in observations if o.photo.file not in held_out]
        test = [o for o in observations if o.photo.file in held_out]
        calibration = fit_calibration(train, terms)
        losses += log_losses(test, calibration)
        for o in test:
            for key, evidence in o.evidence.items():
                if round(calibration.probability(evidence) * 100, 2) >= DEFAULT_THRESHOLD * 100:
                    shown += 1
                    right += key in o.photo.right
    return sum(losses) / len(losses), right, shown


if __name__ == "__main__":
    sys.exit(main())
