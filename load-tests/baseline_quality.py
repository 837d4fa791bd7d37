"""Top-5 recall and precision at the default threshold of whichever engine is on the import path,
counted as `load-tests/quality_report.py` counts them, through nothing but `TaggingEngine.predict`
and the vocabulary: so the same file measures an older commit of the engine on today's labels.

    git worktree add ../imagetag-before 9dc340c
    PYTHONPATH=../imagetag-before IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt \\
        .venv/bin/python load-tests/baseline_quality.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image

from inference.engine import TaggingEngine
from inference.vocabulary import Vocabulary
from service.settings import Settings

EVALSET = Path(__file__).resolve().parents[1] / "tests" / "evalset"


def main() -> int:
    split = sys.argv[1] if len(sys.argv) > 1 else "test"
    engine = TaggingEngine.build(Settings().engine_config())
    vocabulary = Vocabulary.load()
    with (EVALSET / "labels.tsv").open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if r["split"] == split]
    hits = {"en": 0, "zh": 0}
    expected_photos = right = shown = empty = 0
    shown_confidence = 0.0
    outcomes: list[tuple[float, bool]] = []
    for row in rows:
        expected = {k for k in row["expected"].split(";") if k}
        labelled = expected | {k for k in row["right"].split(";") if k}
        right_keys = labelled | {a for k in labelled for a in vocabulary.ancestors[k]}
        with Image.open(EVALSET / "photos" / row["file"]) as opened:
            (tags,) = engine.predict([opened.convert("RGB")])
        returned = [t for t in tags if round(t.confidence * 100, 2) >= 60][:50]
        outcomes += [(t.confidence, t.tag.key in right_keys) for t in tags]
        right += sum(t.tag.key in right_keys for t in returned)
        shown += len(returned)
        shown_confidence += sum(t.confidence for t in returned)
        empty += not returned
        if expected:
            expected_photos += 1
            for language in hits:
                names = {getattr(vocabulary.tags[k], language) for k in expected}
                hits[language] += bool(names & {getattr(t.tag, language) for t in tags[:5]})
    print(f"{len(rows)} {split} photos")
    print(f"precision at 60: {right / shown:.4f} ({right}/{shown}); photos with no tag: {empty}/{len(rows)}")
    print(f"mean confidence of the tags returned at 60: {shown_confidence / shown:.4f}")
    print(f"expected calibration error (10 bins, every tag): {calibration_error(outcomes):.3f}")
    for language, count in hits.items():
        print(f"top-5 recall ({language}): {count / expected_photos:.4f} ({count}/{expected_photos})")
    return 0


def calibration_error(outcomes: list[tuple[float, bool]]) -> float:
    """Kept apart from inference.evaluation on purpose: an older commit does not have that module."""
    by_bin: dict[int, list[tuple[float, bool]]] = {}
    for confidence, right in outcomes:
        by_bin.setdefault(min(int(confidence * 10), 9), []).append((confidence, right))
    return sum(
        abs(sum(r for _, r in group) - sum(c for c, _ in group)) for group in by_bin.values()
    ) / len(outcomes)


if __name__ == "__main__":
    sys.exit(main())
