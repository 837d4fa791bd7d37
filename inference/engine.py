"""The tagging engine: both models and the vocabulary, built once, predicting batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import torch
from PIL import Image

from inference.classifier import Classifier
from inference.client import FailureCounter
from inference.detector import Detector, DetectorLoadError, require_weights
from inference.devices import resolve_device
from inference.fusion import Calibration, fuse
from inference.results import Box, ModelError, ScoredTag
from inference.runtimes import (
    configure_openvino_detector,
    default_cache_dir,
    detector_weights_for,
    keep_runtimes_offline,
    resolve_runtime,
)
from inference.vocabulary import Vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    detector_weights: tuple[Path, ...]
    """One or more detectors, run side by side; each must speak a known class list (COCO-80,
    Open Images V7), and their boxes are fused per tag."""
    classifier_weights: Path | None = None
    device: str = "auto"
    detector_image_size: int = 640
    detector_min_confidence: float = 0.25
    torch_threads: int | None = None
    calibration: Calibration | None = None
    """None: the fitted calibration that ships with the vocabulary."""
    classifier_runtime: str = "auto"
    """auto, torch, onnx or openvino (see `inference.runtimes`)."""
    detector_runtime: str = "auto"
    """auto, torch, onnx or openvino; applies to `.pt` weights (an exported file runs as it is)."""
    runtime_cache_dir: Path | None = None
    """Where ONNX/OpenVINO exports are made once and reused; None: the user's cache folder."""


class TaggingEngine:
    """`predict(batch)` gives one result per image: its tags, or the `ModelError` it raised."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        classifier: Classifier,
        detectors: tuple[Detector, ...],
        calibration: Calibration,
        failed_batches: FailureCounter | None = None,
    ) -> None:
        self.vocabulary = vocabulary
        self.classifier = classifier
        self.detectors = detectors
        self.calibration = calibration
        self.detector_keys = _detector_keys(detectors, vocabulary)
        self.failed_batches = failed_batches

    @classmethod
    def build(
        cls, config: EngineConfig, failed_batches: FailureCounter | None = None, warm: bool = True
    ) -> TaggingEngine:
        """`warm`: run one image through `predict` (a caller that serves otherwise warms its own way)."""
        for weights in config.detector_weights:  # before minutes of classifier set-up, not after
            require_weights(weights)
        keep_runtimes_offline()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = resolve_device(config.device)
        vocabulary = Vocabulary.load()
        calibration = config.calibration or Calibration.load()
        cache_dir = config.runtime_cache_dir or default_cache_dir()
        classifier = _build_with_fallback(
            "classifier",
            config.classifier_runtime,
            device,
            lambda runtime: Classifier(
                config.classifier_weights, device, runtime, cache_dir, config.torch_threads
            ),
        )
        detector_files: list[Path] = []

        def build_detector(weights: Path, runtime: str) -> Detector:
            detector_files.append(detector_weights_for(weights, runtime, cache_dir, config.detector_image_size))
            detector = Detector(
                detector_files[-1],
                device,
                config.detector_image_size,
                config.detector_min_confidence,
                upscale_small=calibration.detector_upscale_small,
            )
            configure_openvino_detector(detector, config.torch_threads)
            return detector

        detectors = tuple(
            _build_with_fallback(
                "detector", config.detector_runtime, device, lambda runtime, w=weights: build_detector(w, runtime)
            )
            for weights in config.detector_weights
        )
        engine = cls(vocabulary, classifier, detectors, calibration, failed_batches)
        if warm:
            engine.warm_up()
        log.info(
            "models ready on %s: classifier on %s, detectors %s",
            device,
            classifier.runtime,
            ", ".join(str(f) for f in detector_files),
        )
        return engine

    def warm_up(self) -> None:
        """Runs one image through both models so the first request does not pay for lazy setup."""
        self.predict([Image.new("RGB", (64, 64), (127, 127, 127))])

    def predict(self, images: list[Image.Image]) -> list[list[ScoredTag] | ModelError]:
        return run_or_retry_each(images, self._predict_batch, self.failed_batches)

    def _predict_batch(self, images: list[Image.Image]) -> list[list[ScoredTag]]:
        probabilities = self.classifier.predict(images)
        boxes = self.detect(images)
        return [
            fuse(self.vocabulary, p, b, self.detector_keys, self.calibration)
            for p, b in zip(probabilities, boxes)
        ]


    def detect(self, images: list[Image.Image]) -> list[list[Box]]:
        """Every detector's boxes for each image, together."""
        found: list[list[Box]] = [[] for _ in images]
        for detector in self.detectors:
            for boxes, more in zip(found, detector.predict(images)):
                boxes.extend(more)
        return found


def run_or_retry_each(items: list, run_batch, failed_batches: FailureCounter | None) -> list:
    """`run_batch(items)`, one result per item; when the batch fails, each item alone, so that one
    image that breaks a batch does not fail its neighbours and an image that fails alone gets its
    `ModelError`."""
    try:
        results = run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"the models gave {len(results)} results for {len(items)} images")
        return results
    except Exception:
        if len(items) == 1:
            log.exception("model failure on a single image")
            return [ModelError("the model failed to process this image")]
        # A retried batch costs len(items) model calls: never let that pass as mere slowness.
        log.exception("a batch of %d images failed; retrying them one by one", len(items))
        if failed_batches is not None:
            failed_batches.inc()
    return [result for item in items for result in run_or_retry_each([item], run_batch, failed_batches)]


def _build_with_fallback(model: str, requested: str, device: torch.device, build):
    """Builds `model` on the requested runtime. An explicit choice that fails is an error; `auto`
    that fails (say, an export that cannot be written) falls back to PyTorch with a warning."""
    runtime = resolve_runtime(requested, device, model)
    try:
        return build(runtime)
    except Exception as error:
        if requested != "auto" or runtime == "torch":
            raise
        log.warning("cannot run the %s on %s (%r); using torch instead", model, runtime, error)
        return build("torch")


def _detector_keys(detectors: tuple[Detector, ...], vocabulary: Vocabulary) -> dict[str, str]:
    """Maps every detector's class names ("hair drier", "Adhesive tape") onto tag keys, through
    the one known class list that holds all of a detector's names."""
    keys: dict[str, str] = {}
    for detector in detectors:
        names = set(detector.names.values())
        known = {table: classes for table, classes in vocabulary.detector_classes.items() if names <= classes.keys()}
        if not known:
            closest = max(vocabulary.detector_classes.values(), key=lambda classes: len(names & classes.keys()))
            unknown = sorted(names - closest.keys())
            raise DetectorLoadError(
                f"detector {detector.weights} has classes no known class list ("
                f"{', '.join(vocabulary.detector_classes)}) names: {', '.join(map(repr, unknown[:10]))}"
                f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}"
            )
        classes = next(iter(known.values()))
        for name in names:
            if keys.setdefault(name, classes[name]) != classes[name]:
                raise DetectorLoadError(f"two detectors mean different things by class {name!r}")
    return keys
