"""Every runtime the engine can choose gives the PyTorch reference's answers, within stated tolerances.

Tolerances (all runtimes shipped run the float32 weights; measured differences are ~1e-6):
- classifier: the same top-3 classes in the same order, every probability within 0.002 absolute;
- detector: the same boxes: same class, IoU > 0.9, corners within 1 px, confidence within 0.01;
  a box may be missing or extra only if its confidence is within 0.01 of the 0.25 threshold;
- engine: the same tags above 10 % with confidences within 0.02, and the same top tag;
- CUDA, half precision (where a GPU is present): top-1 class and probabilities within 0.02;
  tags and boxes as tests/inference/agreement.py states (`HALF`).

Exports are made once per session into a temporary folder (offline, ~10 s in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import runtimes
from inference.classifier import Classifier, load_model, preprocess
from inference.detector import Box, Detector
from inference.engine import EngineConfig, TaggingEngine
from inference.runtimes import RuntimeUnavailable, export_detector, resolve_runtime, runtime_installed
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS
from tests.inference.agreement import HALF, assert_same_answers

CPU = torch.device("cpu")
PROBABILITY_TOLERANCE = 0.002
BOX_IOU = 0.9
BOX_PIXELS = 1.0
CONFIDENCE_TOLERANCE = 0.01
MIN_CONFIDENCE = 0.25
TAG_TOLERANCE = 0.02

ALTERNATIVES = [
    pytest.param(
        runtime,
        marks=pytest.mark.skipif(
            not runtime_installed(runtime, "detector"), reason=f"{runtime} not installed"
        ),
    )
    for runtime in ("onnx", "openvino")
]


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]


@pytest.fixture(scope="session")
def reference_probabilities(photos) -> np.ndarray:
    """The classifier as it ran before runtimes existed: eager float32 PyTorch."""
    model = load_model()
    batches = [torch.stack([preprocess(p) for p in photos[i : i + 8]]) for i in range(0, len(photos), 8)]
    with torch.inference_mode():
        return np.concatenate([model(batch).softmax(-1).numpy() for batch in batches])


@pytest.fixture(scope="session")
def reference_detector() -> Detector:
    return Detector(DETECTOR_WEIGHTS, CPU, 640, MIN_CONFIDENCE)


def assert_same_classification(probabilities: np.ndarray, reference: np.ndarray) -> None:
    assert probabilities.shape == reference.shape
    for row, (got, want) in enumerate(zip(probabilities, reference)):
        assert list(np.argsort(-got)[:3]) == list(np.argsort(-want)[:3]), f"photo {row}: top-3 differs"
        worst = float(np.abs(got - want).max())
        assert worst <= PROBABILITY_TOLERANCE, f"photo {row}: a probability is off by {worst:.4f}"


def iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a.x + a.width, b.x + b.width) - max(a.x, b.x))
    height = max(0.0, min(a.y + a.height, b.y + b.height) - max(a.y, b.y))
    inter = width * height
    return inter / (a.width * a.height + b.width * b.height - inter)


def assert_same_boxes(got: list[Box], want: list[Box], where: str) -> None:
    unmatched = list(got)
    for box in sorted(want, key=lambda b: -b.confidence):
        same_class = [b for b in unmatched if b.class_name == box.class_name]
        best = max(same_class, key=lambda b: iou(b, box), default=None)
        if best is None or iou(best, box) <= BOX_IOU:
            assert box.confidence < MIN_CONFIDENCE + CONFIDENCE_TOLERANCE, f"{where}: lost {box}"
            continue
        unmatched.remove(best)
        corners = np.array([best.x, best.y, best.x + best.width, best.y + best.height])
        expected = np.array([box.x, box.y, box.x + box.width, box.y + box.height])
        assert np.abs(corners - expected).max() <= BOX_PIXELS, f"{where}: {best} moved from {box}"
        assert abs(best.confidence - box.confidence) <= CONFIDENCE_TOLERANCE, f"{where}: {best} vs {box}"
    for extra in unmatched:
        assert extra.confidence < MIN_CONFIDENCE + CONFIDENCE_TOLERANCE, f"{where}: extra {extra}"


# --- classifier ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "runtime",
    [
        "torch",
        *[
            pytest.param(r, marks=pytest.mark.skipif(not runtime_installed(r), reason=f"{r} not installed"))
            for r in ("onnx", "openvino")
        ],
    ],
)
def test_classifier_runtime_matches_reference(runtime, runtime_cache, photos, reference_probabilities):
    classifier = Classifier(None, CPU, runtime, runtime_cache, threads=2)
    assert classifier.runtime == runtime
    batched = np.concatenate([classifier.predict(photos[i : i + 8]) for i in range(0, len(photos), 8)])
    assert_same_classification(batched, reference_probabilities)
    alone = np.concatenate([classifier.predict([photo]) for photo in photos[:4]])
    assert_same_classification(alone, reference_probabilities[:4])


def test_the_classifier_check_catches_a_different_model(photos, reference_probabilities):
    """The comparison is not vacuous: the ImageNet mean/std preprocessing (a plausible mistake)
    shifts probabilities well past the tolerance."""
    model = load_model()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    with torch.inference_mode():
        wrong = torch.stack([(preprocess(p) * 128 + 127 - mean) / std for p in photos[:8]])
        probabilities = model(wrong).softmax(-1).numpy()
    with pytest.raises(AssertionError):
        assert_same_classification(probabilities, reference_probabilities[:8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifier_half_precision_on_cuda_matches_reference(photos, reference_probabilities):
    classifier = Classifier(None, torch.device("cuda"), "torch")
    probabilities = np.concatenate([classifier.predict(photos[i : i + 8]) for i in range(0, len(photos), 8)])
    for got, want in zip(probabilities, reference_probabilities):
        assert np.argmax(got) == np.argmax(want)
        assert np.abs(got - want).max() <= TAG_TOLERANCE


@pytest.mark.skipif(not runtime_installed("onnx"), reason="onnx and onnxruntime not installed")
def test_classifier_export_is_made_once_and_reused(runtime_cache, monkeypatch):
    Classifier(None, CPU, "onnx", runtime_cache)  # exported here, or by an earlier test

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert Classifier(None, CPU, "onnx", runtime_cache).runtime == "onnx"
    assert not list(runtime_cache.glob(".*tmp*")), "a staging file was left behind"


# --- detector -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_boxes(reference_detector, photos) -> dict[str, list[list[Box]]]:
    return {
        "alone": [reference_detector.predict([photo])[0] for photo in photos],
        "batch": reference_detector.predict(photos[:8]),
    }


@pytest.mark.parametrize("runtime", ALTERNATIVES)
def test_detector_export_matches_reference(runtime, runtime_cache, photos, reference_boxes):
    exported = export_detector(DETECTOR_WEIGHTS, runtime, runtime_cache)
    assert exported.exists() and exported.parent == runtime_cache
    detector = Detector(exported, CPU, 640, MIN_CONFIDENCE)
    assert not detector.batched  # on a CPU the detector goes one image at a time (see Detector)
    runtimes.configure_openvino_detector(detector, threads=2)
    for index, (photo, want) in enumerate(zip(photos, reference_boxes["alone"])):
        assert_same_boxes(detector.predict([photo])[0], want, f"{runtime} photo {index}")
    for index, (got, want) in enumerate(zip(detector.predict(photos[:8]), reference_boxes["batch"], strict=True)):
        assert_same_boxes(got, want, f"{runtime} batch photo {index}")
    assert sum(len(boxes) for boxes in reference_boxes["alone"]) > 20  # the photos have things in them


def test_the_box_check_catches_a_moved_box():
    box = Box(0.9, 10, 10, 100, 200, class_name="person")
    assert_same_boxes([Box(0.905, 10.5, 10, 100, 200, class_name="person")], [box], "close")
    with pytest.raises(AssertionError):
        assert_same_boxes([Box(0.9, 13, 10, 100, 200, class_name="person")], [box], "moved")
    with pytest.raises(AssertionError):
        assert_same_boxes([Box(0.87, 10, 10, 100, 200, class_name="person")], [box], "less confident")
    with pytest.raises(AssertionError):
        assert_same_boxes([Box(0.9, 10, 10, 100, 200, class_name="dog")], [box], "another class")
    with pytest.raises(AssertionError):
        assert_same_boxes([Box(0.3, 0, 0, 5, 5, class_name="cup")], [], "new box")
    assert_same_boxes([], [Box(0.255, 0, 0, 5, 5, class_name="cup")], "at the threshold")


def test_detector_export_is_reused(runtime_cache, monkeypatch):
    pytest.importorskip("onnx")
    first = export_detector(DETECTOR_WEIGHTS, "onnx", runtime_cache)
    import ultralytics

    monkeypatch.setattr(ultralytics.YOLO, "export", lambda *a, **k: pytest.fail("exported again"))
    assert export_detector(DETECTOR_WEIGHTS, "onnx", runtime_cache) == first


# --- choosing a runtime -------------------------------------------------------------------------


def test_auto_takes_the_fastest_installed_runtime_on_cpu(monkeypatch):
    for model in ("classifier", "detector"):
        expected = next(r for r in runtimes.CPU_PREFERENCE[model] if runtime_installed(r, model))
        assert resolve_runtime("auto", CPU, model) == expected
    monkeypatch.setattr(runtimes, "runtime_installed", lambda runtime, model="classifier": runtime == "torch")
    assert resolve_runtime("auto", CPU, "classifier") == "torch"
    assert resolve_runtime("auto", CPU, "detector") == "torch"
    with pytest.raises(RuntimeUnavailable, match="needs"):
        resolve_runtime("openvino", CPU, "classifier")


def test_cuda_gets_torch_and_cpu_only_runtimes_are_refused():
    cuda = torch.device("cuda")  # only a name here: nothing runs on it
    assert resolve_runtime("auto", cuda, "classifier") == "torch"
    assert resolve_runtime("auto", cuda, "detector") == "torch"
    with pytest.raises(RuntimeUnavailable, match="CPU only"):
        resolve_runtime("onnx", cuda, "classifier")
    with pytest.raises(RuntimeUnavailable, match="unknown"):
        resolve_runtime("tensorrt", CPU, "detector")


def test_exported_detector_files_are_loaded_as_they_are(tmp_path):
    tflite = DETECTOR_WEIGHTS.parent / "yolov8n_int8.tflite"
    assert runtimes.detector_weights_for(tflite, "openvino", tmp_path) == tflite
    assert runtimes.detector_weights_for(DETECTOR_WEIGHTS, "torch", tmp_path) == DETECTOR_WEIGHTS
    missing = tmp_path / "missing.pt"
    assert runtimes.detector_weights_for(missing, "onnx", tmp_path) == missing
    assert not list(tmp_path.iterdir())


# --- the engine ---------------------------------------------------------------------------------


def engine_config(cache: Path, classifier: str, detector: str) -> EngineConfig:
    return EngineConfig(
        detector_weights=(DETECTOR_WEIGHTS,),
        device="cpu",
        torch_threads=2,
        classifier_runtime=classifier,
        detector_runtime=detector,
        runtime_cache_dir=cache,
    )


def assert_same_tags(engine: TaggingEngine, reference: TaggingEngine, photos, tolerance: float) -> None:
    batches = [photos[i : i + 8] for i in range(0, len(photos), 8)]
    engine_tags = [tags for batch in batches for tags in engine.predict(batch)]
    reference_tags = [tags for batch in batches for tags in reference.predict(batch)]
    for index, (got, want) in enumerate(zip(engine_tags, reference_tags, strict=True)):
        got_scores = {t.tag.key: t.confidence for t in got}
        want_scores = {t.tag.key: t.confidence for t in want}
        for key in set(got_scores) | set(want_scores):
            got_score, want_score = got_scores.get(key, 0.0), want_scores.get(key, 0.0)
            if max(got_score, want_score) > 0.1:
                assert got_score == pytest.approx(want_score, abs=tolerance), f"photo {index}: {key}"
        top = want[0]  # the same top tag, unless another is tied with it within the tolerance
        assert got[0].tag.key == top.tag.key or got_scores[top.tag.key] >= top.confidence - tolerance


def test_engine_on_the_chosen_runtimes_tags_like_the_reference(runtime_cache, photos):
    chosen = TaggingEngine.build(engine_config(runtime_cache, "auto", "auto"))
    reference = TaggingEngine.build(engine_config(runtime_cache, "torch", "torch"))
    assert chosen.classifier.runtime == resolve_runtime("auto", CPU, "classifier")
    assert_same_tags(chosen, reference, photos, TAG_TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_in_half_precision_tags_like_the_cpu_reference(runtime_cache, photos):
    """Within tests/inference/agreement.py's tolerances: a box that float16 moves across the
    detector's threshold may take its tags with it, nothing else may differ."""
    on_cuda = TaggingEngine.build(replace(engine_config(runtime_cache, "auto", "auto"), device="cuda"))
    assert on_cuda.classifier.runtime == "torch" and on_cuda.detectors[0].half
    reference = TaggingEngine.build(engine_config(runtime_cache, "torch", "torch"))
    for start in range(0, len(photos), 8):
        batch = photos[start : start + 8]
        found = zip(on_cuda.predict(batch), on_cuda.detect(batch))
        expected = zip(reference.predict(batch), reference.detect(batch))
        for got, want in zip(found, expected, strict=True):
            assert_same_answers(reference, got, want, HALF)


def test_auto_falls_back_to_torch_when_exports_cannot_be_written(tmp_path, caplog):
    if resolve_runtime("auto", CPU, "classifier") == "torch":
        pytest.skip("no faster runtime installed")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    engine = TaggingEngine.build(engine_config(blocked, "auto", "auto"))
    assert engine.classifier.runtime == "torch"
    assert "using torch instead" in caplog.text
    with pytest.raises(OSError):
        TaggingEngine.build(engine_config(blocked, resolve_runtime("auto", CPU, "classifier"), "torch"))


@pytest.mark.skipif(not runtime_installed("openvino"), reason="openvino not installed")
def test_openvino_does_not_phone_home():
    """`import openvino` and `ov.convert_model` send usage telemetry unless stopped (see runtimes)."""
    check = (
        "import os, sys, inference.detector, inference.runtimes\n"
        "assert 'openvino_telemetry' not in sys.modules and 'YOLO_OFFLINE' not in os.environ  # not at import\n"
        "inference.runtimes.keep_runtimes_offline()\n"
        "import openvino\n"
        "from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils\n"
        "assert sys.modules['openvino_telemetry'] is None and os.environ['YOLO_OFFLINE'] == 'true'\n"
        "assert convert_impl.tm is telemetry_stub and telemetry_utils.tm is telemetry_stub\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    subprocess.run([sys.executable, "-c", check], check=True, env=environment)


def test_exports_leave_no_scratch_behind(runtime_cache):
    assert not [p.name for p in runtime_cache.iterdir() if p.name.startswith(".")]
