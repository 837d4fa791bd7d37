"""Quality report: is the tag a person expects among the top 5, in English and in Chinese?

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/quality_report.py

Reads `tests/photos/expected.tsv` (one expected tag per photo, chosen when the photos were
collected, before any tuning) and prints a Markdown table plus the hit counts.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image

from inference.engine import TaggingEngine
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "photos"
TOP = 5


def main() -> int:
    settings = Settings()
    engine = TaggingEngine.build(settings.engine_config())
    with (PHOTOS / "expected.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    print(f"Detector: `{settings.detector_weights.name}`; classifier: EfficientNet-Lite2.\n")
    print(f"| photo | expected | top {TOP} (en) | top {TOP} (zh) | en | zh |")
    print("|---|---|---|---|---|---|")
    hits = {"en": 0, "zh": 0}
    for row in rows:
        image = Image.open(PHOTOS / row["file"]).convert("RGB")
        (tags,) = engine.predict([image])
        top = tags[:TOP]
        english = [f"{t.tag.en} {t.confidence * 100:.0f}" for t in top]
        chinese = [f"{t.tag.zh} {t.confidence * 100:.0f}" for t in top]
        hit_en = row["expected_en"] in [t.tag.en for t in top]
        hit_zh = row["expected_zh"] in [t.tag.zh for t in top]
        hits["en"] += hit_en
        hits["zh"] += hit_zh
        print(
            f"| {row['file']} | {row['expected_en']} / {row['expected_zh']} | {', '.join(english)} "
            f"| {'，'.join(chinese)} | {'yes' if hit_en else 'no'} | {'yes' if hit_zh else 'no'} |"
        )
    print(f"\nExpected tag in the top {TOP}: {hits['en']}/{len(rows)} in English, {hits['zh']}/{len(rows)} in Chinese.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
