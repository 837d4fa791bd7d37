"""What a second detector costs: time per image of the engine with the COCO detector alone, and
with an Open Images V7 detector beside it (YOLOv8n and YOLOv8s architectures, 601 classes).

    IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt .venv/bin/python load-tests/detector_cost.py

The official Open Images weights cannot be downloaded on the development machines, so the
Open Images detectors here have the real architecture and class list with untrained weights:
the network's compute is the same, only the few boxes a trained model would add to NMS are
missing. Every configuration runs the same photos in the same process, one image at a time (as
the CPU serves them), after a warm-up; the COCO-alone run is the baseline.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import ultralytics
import yaml
from PIL import Image

from inference.engine import TaggingEngine
from service.settings import Settings

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "evalset" / "photos"
IMAGES = 60


def untrained_open_images_detector(scale: str, directory: Path) -> Path:
    from ultralytics.nn.tasks import DetectionModel

    names = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/datasets/open-images-v7.yaml").read_text())["names"]
    model = DetectionModel(f"yolov8{scale}.yaml", nc=len(names), verbose=False)
    model.names = dict(names)
    path = directory / f"yolov8{scale}-oiv7-untrained.pt"
    torch.save({"model": model.half(), "train_args": {"imgsz": 640, "task": "detect"}, "epoch": -1}, path)
    return path


def time_per_image(engine: TaggingEngine, images: list[Image.Image]) -> list[float]:
    engine.predict(images[:2])
    seconds = []
    for image in images:
        start = time.perf_counter()
        engine.predict([image])
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> int:
    settings = Settings()
    config = settings.engine_config()
    files = sorted(PHOTOS.glob("*.jpg"))[:IMAGES]
    images = [Image.open(f).convert("RGB") for f in files]
    with tempfile.TemporaryDirectory() as work:
        runs = {"COCO YOLOv8n alone (baseline)": config.detector_weights}
        for scale in ("n", "s"):
            extra = untrained_open_images_detector(scale, Path(work))
            runs[f"+ Open Images YOLOv8{scale} (601 classes)"] = (*config.detector_weights, extra)
        print(f"{len(images)} photos of tests/evalset, one at a time, torch threads: {torch.get_num_threads()}\n")
        print("| detectors | ms per image (mean) | p50 | p90 | vs baseline |")
        print("|---|---|---|---|---|")
        baseline = None
        for name, weights in runs.items():
            # Exports of the untrained detectors go to the temporary folder, not the user's cache.
            engine = TaggingEngine.build(
                dataclasses.replace(config, detector_weights=weights, runtime_cache_dir=Path(work))
            )
            seconds = sorted(time_per_image(engine, images))
            mean = statistics.fmean(seconds) * 1000
            baseline = baseline or mean
            print(
                f"| {name} | {mean:.1f} | {seconds[len(seconds) // 2] * 1000:.1f} "
                f"| {seconds[int(len(seconds) * 0.9)] * 1000:.1f} | {mean / baseline:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
