"""Ultralytics YOLO detector, loaded from a path in any format ultralytics reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

class DetectorLoadError(RuntimeError):
    """The configured weights cannot be used; raised at start-up with a message for operators."""


@dataclass(frozen=True)
class Box:
    class_name: str
    confidence: float
    """The detector's own score, 0..1."""
    x: float
    y: float
    width: float
    height: float


def require_weights(weights: Path) -> None:
    if not weights.exists():
        raise DetectorLoadError(
            f"detector weights {weights} not found: set IMAGETAG_DETECTOR_WEIGHTS, or run "
            "`imagetag weights fetch yolo11n` on a machine with internet access"
        )


# Formats whose exported graph has a fixed batch size of one.
_SINGLE_IMAGE_SUFFIXES = (".tflite",)


class Detector:
    """Boxes for a batch of RGB images, in each image's own pixel coordinates."""

    def __init__(
        self, weights: Path, device: torch.device, image_size: int, min_confidence: float
    ) -> None:
        require_weights(weights)
        from inference.runtimes import keep_runtimes_offline

        keep_runtimes_offline()
        from ultralytics import YOLO

        try:
            self.model = YOLO(str(weights), task="detect")
            # Reading the names builds the runtime backend, which is where a missing runtime
            # package (ai-edge-litert, onnxruntime, openvino) shows up.
            self.names: dict[int, str] = dict(self.model.names)
        except Exception as error:  # ultralytics raises many unrelated types for a bad file
            raise DetectorLoadError(f"cannot load detector weights {weights}: {error!r}") from error
        self.device = device
        self.image_size = image_size
        self.min_confidence = min_confidence
        # Ultralytics pads a batch of mixed-size images to 640x640 squares but a single image only
        # to a tight rectangle, so a batch changes the boxes a little and, on a CPU, costs more per
        # image than one at a time (load-tests/runtimes.py). Only a GPU gains from batching here.
        self.batched = device.type == "cuda" and not str(weights).endswith(_SINGLE_IMAGE_SUFFIXES)
        self.half = device.type == "cuda"

    def predict(self, images: list[Image.Image]) -> list[list[Box]]:
        if self.batched:
            return self._predict(images)
        return [self._predict([image])[0] for image in images]

    def _predict(self, images: list[Image.Image]) -> list[list[Box]]:
        results = self.model.predict(
            images,
            imgsz=self.image_size,
            conf=self.min_confidence,
            device=self.device,
            half=self.half,
            verbose=False,
        )
        return [self._boxes(result) for result in results]

    def _boxes(self, result) -> list[Box]:
        boxes = result.boxes
        found = []
        for cls, conf, (x1, y1, x2, y2) in zip(
            boxes.cls.tolist(), boxes.conf.tolist(), boxes.xyxy.tolist()
        ):
            found.append(Box(self.names[int(cls)], conf, x1, y1, x2 - x1, y2 - y1))
        return found
