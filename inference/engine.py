"""The tagging engine: both models and the vocabulary, built once, predicting batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from inference.classifier import Classifier
from inference.detector import Detector, DetectorLoadError, require_weights
from inference.fusion import Calibration, ScoredTag, fuse
from inference.runtimes import (
    configure_openvino_detector,
    default_cache_dir,
    detector_weights_for,
    keep_runtimes_offline,
    resolve_runtime,
)
from inference.vocabulary import Vocabulary

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """The models failed on one image; carried in that image's result slot."""


@dataclass(frozen=True)
class EngineConfig:
    detector_weights: Path
    classifier_weights: Path | None = None
    device: str = "auto"
    detector_image_size: int = 640
    detector_min_confidence: float = 0.25
    torch_threads: int | None = None
    calibration: Calibration = field(default_factory=Calibration)
    classifier_runtime: str = "auto"
    """auto, torch, onnx or openvino (see `inference.runtimes`)."""
    detector_runtime: str = "auto"
    """auto, torch, onnx or openvino; applies to `.pt` weights (an exported file runs as it is)."""
    runtime_cache_dir: Path | None = None
    """Where ONNX/OpenVINO exports are made once and reused; None: the user's cache folder."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TaggingEngine:
    """`predict(batch)` gives one result per image: its tags, or the `ModelError` it raised."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        classifier: Classifier,
        detector: Detector,
        calibration: Calibration,
    ) -> None:
        self.vocabulary = vocabulary
        self.classifier = classifier
        self.detector = detector
        self.calibration = calibration
        self.detector_keys = _detector_keys(detector.names.values(), vocabulary)

    @classmethod
    def build(cls, config: EngineConfig) -> TaggingEngine:
        require_weights(config.detector_weights)  # before minutes of classifier set-up, not after
        keep_runtimes_offline()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        device = resolve_device(config.device)
        vocabulary = Vocabulary.load()
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

        def build_detector(runtime: str) -> Detector:
            detector_files.append(
                detector_weights_for(config.detector_weights, runtime, cache_dir, config.detector_image_size)
            )
            detector = Detector(
                detector_files[-1], device, config.detector_image_size, config.detector_min_confidence
            )
            configure_openvino_detector(detector, config.torch_threads)
            return detector

        detector = _build_with_fallback("detector", config.detector_runtime, device, build_detector)
        engine = cls(vocabulary, classifier, detector, config.calibration)
        engine.warm_up()
        log.info(
            "models ready on %s: classifier on %s, detector %s",
            device,
            classifier.runtime,
            detector_files[-1],
        )
        return engine

    def warm_up(self) -> None:
        """Runs one image through both models so the first request does not pay for lazy setup."""
        self.predict([Image.new("RGB", (64, 64), (127, 127, 127))])

    def predict(self, images: list[Image.Image]) -> list[list[ScoredTag] | ModelError]:
        try:
            results = self._predict_batch(images)
            if len(results) != len(images):
                raise RuntimeError(f"the models gave {len(results)} results for {len(images)} images")
            return results
        except Exception:
            if len(images) == 1:
                log.exception("model failure on a single image")
                return [ModelError("the model failed to process this image")]
        # One image that breaks the batch must not fail its neighbours: retry them one by one.
        results: list[list[ScoredTag] | ModelError] = []
        for image in images:
            results.extend(self.predict([image]))
        return results

    def _predict_batch(self, images: list[Image.Image]) -> list[list[ScoredTag]]:
        probabilities = self.classifier.predict(images)
        boxes = self.detector.predict(images)
        return [
            fuse(self.vocabulary, p, b, self.detector_keys, self.calibration)
            for p, b in zip(probabilities, boxes)
        ]


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


def _detector_keys(class_names, vocabulary: Vocabulary) -> dict[str, str]:
    """Maps the detector's class names ("hair drier") onto tag keys ("hair_drier")."""
    keys = {}
    for name in class_names:
        key = name.strip().lower().replace(" ", "_")
        if key not in vocabulary.tags:
            raise DetectorLoadError(
                f"detector class {name!r} has no entry in the tag vocabulary; "
                "only COCO-80 detectors are supported"
            )
        keys[name] = key
    return keys
