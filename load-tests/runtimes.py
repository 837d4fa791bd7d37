"""Runtime comparison: milliseconds per image for each model on each runtime, batch 1 and 8.

    .venv/bin/python load-tests/runtimes.py [--runs 10] [--threads 2] [--cache-dir DIR]

Reads `IMAGETAG_DETECTOR_WEIGHTS` (default `../shared/weights/yolov8n-w8.pt`) and, for the TFLite
rows, the `.tflite` files beside it. Exports (ONNX, OpenVINO) are made once into `--cache-dir`
(default: a temporary folder) and not timed. Each cell is the median over `--runs` rounds, with
the best round in brackets; the rounds go through the runtimes in turn, so background load
drifting during the run hits all of them alike.

- classifier rows: `Classifier.predict` on real photos, preprocessing included (its own row
  shows what that costs, the same for every runtime);
- detector rows: `Detector.predict` (ultralytics' letterbox, inference and NMS);
- engine rows: `TaggingEngine.predict` (both models and fusion), as the service runs it.

"Batch 1" is each of 8 photos predicted alone; "batch 8" is the 8 in one call, divided by 8.
Prints a Markdown table, with the command, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from inference.classifier import Classifier, load_model, preprocess
from inference.detector import Detector
from inference.engine import EngineConfig, TaggingEngine
from inference.runtimes import (
    configure_openvino_detector,
    export_detector,
    installed,
    keep_runtimes_offline,
    resolve_runtime,
    runtime_installed,
)

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "photos"
# Eight real photos of different sizes and aspect ratios.
BENCH_PHOTOS = [
    "bus.jpg", "cat_chelsea.jpg", "coffee.jpg", "dogs_spaniels.jpg",
    "astronaut.jpg", "boats_lake.jpg", "grace_hopper.jpg", "mountain_picos.jpg",
]
DEFAULT_DETECTOR = REPO.parent / "shared" / "weights" / "yolov8n-w8.pt"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
    found = [flag for flag in wanted if flag in flags]
    return ", ".join(found) or "no AVX2"


def versions() -> str:
    import ultralytics

    parts = [f"torch {torch.__version__}", f"ultralytics {ultralytics.__version__}"]
    for package in ("onnxruntime", "openvino", "ai_edge_litert"):
        try:
            module = __import__(package)
            parts.append(f"{package} {getattr(module, '__version__', '?')}")
        except ImportError:
            parts.append(f"{package} not installed")
    return ", ".join(parts)


class Case:
    """One row: a name and a predict(list of images) callable; batch 1 and batch 8 samples."""

    def __init__(
        self, group: str, name: str, predict: Callable[[list[Image.Image]], object], batched: bool = True
    ) -> None:
        self.group = group
        self.name = name
        self.predict = predict
        self.batched = batched
        self.single: list[float] = []
        self.batch: list[float] = []

    def warm(self, images: list[Image.Image]) -> None:
        for image in images[:2]:
            self.predict([image])
        if self.batched:
            self.predict(images)

    def round(self, images: list[Image.Image]) -> None:
        start = time.perf_counter()
        for image in images:
            self.predict([image])
        self.single.append((time.perf_counter() - start) / len(images) * 1000)
        if self.batched:
            start = time.perf_counter()
            self.predict(images)
            self.batch.append((time.perf_counter() - start) / len(images) * 1000)


def classifier_cases(cache_dir: Path, threads: int) -> list[Case]:
    cpu = torch.device("cpu")
    reference = load_model()

    @torch.inference_mode()
    def eager(images):
        return reference(torch.stack([preprocess(image) for image in images])).softmax(-1).numpy()

    cases = [
        Case("classifier", "preprocessing only (all runtimes)", lambda images: [preprocess(i) for i in images]),
        Case("classifier", "PyTorch eager fp32 (before)", eager),
        Case("classifier", "PyTorch, BN folded, channels_last", Classifier(None, cpu, "torch").predict),
    ]
    for runtime, label in (("onnx", "ONNX Runtime"), ("openvino", "OpenVINO")):
        if runtime_installed(runtime):
            classifier = Classifier(None, cpu, runtime, cache_dir, threads)
            cases.append(Case("classifier", label, classifier.predict))
    return cases


def detector_cases(weights: Path, cache_dir: Path, threads: int) -> list[Case]:
    cpu = torch.device("cpu")

    def case(name: str, path: Path) -> Case:
        detector = Detector(path, cpu, 640, 0.25)
        configure_openvino_detector(detector, threads)  # as the engine does: float32, not bf16
        return Case("detector", name, detector.predict, batched=detector.batched)

    cases = [case(f"PyTorch `{weights.name}`", weights)]
    for runtime, label in (("onnx", "ONNX Runtime (export)"), ("openvino", "OpenVINO (export)")):
        if runtime_installed(runtime, "detector"):
            cases.append(case(label, export_detector(weights, runtime, cache_dir)))
    if installed("ai_edge_litert"):
        for name in ("yolov8n_int8.tflite", "yolov8n_integer_quant.tflite"):
            if (weights.parent / name).exists():
                cases.append(case(f"TFLite `{name}`", weights.parent / name))
    return cases


def engine_cases(weights: Path, cache_dir: Path, threads: int) -> list[Case]:
    cpu = torch.device("cpu")
    chosen = (resolve_runtime("auto", cpu, "classifier"), resolve_runtime("auto", cpu, "detector"))
    combos = [("torch", "torch")] + [(r, r) for r in ("onnx", "openvino") if runtime_installed(r, "detector")]
    if chosen not in combos:
        combos.append(chosen)
    cases = []
    for classifier_runtime, detector_runtime in combos:
        config = EngineConfig(
            detector_weights=(weights,),
            device="cpu",
            torch_threads=threads,
            classifier_runtime=classifier_runtime,
            detector_runtime=detector_runtime,
            runtime_cache_dir=cache_dir,
        )
        engine = TaggingEngine.build(config)
        label = f"classifier {classifier_runtime}, detector {detector_runtime}"
        if (classifier_runtime, detector_runtime) == chosen:
            label += " (what `auto` picks)"
        cases.append(Case("engine", label, engine.predict))
    return cases


def cell(samples: list[float]) -> str:
    """Median, and the best round in brackets: on a shared machine the best round is the one
    least disturbed by other processes."""
    return f"{statistics.median(samples):.1f} ({min(samples):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    keep_runtimes_offline()
    parser.add_argument("--only", choices=("classifier", "detector", "engine"), action="append")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = Path(os.environ.get("IMAGETAG_DETECTOR_WEIGHTS", DEFAULT_DETECTOR))
    images = [Image.open(PHOTOS / name).convert("RGB") for name in BENCH_PHOTOS]
    groups = args.only or ["classifier", "detector", "engine"]

    with tempfile.TemporaryDirectory(prefix="imagetag-runtimes-") as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        cases: list[Case] = []
        if "classifier" in groups:
            cases += classifier_cases(cache_dir, args.threads)
        if "detector" in groups:
            cases += detector_cases(weights, cache_dir, args.threads)
        if "engine" in groups:
            cases += engine_cases(weights, cache_dir, args.threads)
        for case in cases:
            case.warm(images)
        for index in range(args.runs):
            for case in cases:
                case.round(images)
            print(f"round {index + 1}/{args.runs}", file=sys.stderr, flush=True)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    command = "python load-tests/runtimes.py " + " ".join(sys.argv[1:])
    print(f"`{command.strip()}` on {cpu_name()} ({os.cpu_count()} cores, {isa()}), "
          f"{args.threads} threads, {platform.python_implementation()} {platform.python_version()}; "
          f"{versions()}. Median (best) of {args.runs} rounds, 8 real photos, ms per image; "
          f"load average at the end: {load:.1f}.\n")
    print("| model | runtime | batch 1 | batch 8 |")
    print("|---|---|---|---|")
    for case in cases:
        batch = cell(case.batch) if case.batch else "n/a (batch of 1 only)"
        print(f"| {case.group} | {case.name} | {cell(case.single)} | {batch} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
