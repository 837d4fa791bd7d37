"""The ceiling: `TaggingEngine.predict` on decoded photos, no HTTP, at several batch sizes.

Run by `benchmark.py` in a process of its own; prints nothing useful by itself but the JSON it
writes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from inference.engine import TaggingEngine
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]

BATCH_SIZES = (1, 2, 4, 8, 16)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    engine = TaggingEngine.build(Settings().engine_config())
    photos = [Image.open(p).convert("RGB") for p in sorted((REPO / "tests" / "photos").glob("*.jpg"))]
    ceilings, single = [], []
    per_size = args.duration / len(BATCH_SIZES) * 2
    for batch_size in BATCH_SIZES:
        timings, images, index = [], 0, 0
        started = time.monotonic()
        while time.monotonic() - started < per_size or len(timings) < 3:
            batch = [photos[(index + i) % len(photos)] for i in range(batch_size)]
            index += batch_size
            t0 = time.perf_counter()
            engine.predict(batch)
            timings.append(time.perf_counter() - t0)
            images += batch_size
        elapsed = sum(timings)
        ceilings.append({
            "batch_size": batch_size,
            "images_per_s": images / elapsed,
            "median_batch_ms": 1000 * statistics.median(timings),
        })
        if batch_size == 1:
            single = timings
    args.out.write_text(json.dumps({"ceilings": ceilings, "single_image_ms": 1000 * statistics.median(single)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
