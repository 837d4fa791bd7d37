"""Ultralytics YOLO detector, loaded from a path in any format ultralytics reads."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from inference.device_images import letterbox_shape
from inference.files import weights_problem
from inference.results import Box


class DetectorLoadError(RuntimeError):
    """The configured weights cannot be used; raised at start-up with a message for operators."""


def require_weights(weights: Path) -> None:
    """The start-up checks' (service/preflight.py) verdict on a weights file, for callers that
    build a detector without them (tests, load-tests, the Python API)."""
    if problem := weights_problem(weights):
        raise DetectorLoadError(
            f"detector weights {weights}: {problem}; set IMAGETAG_DETECTOR_WEIGHTS, or run "
            "`imagetag weights fetch yolo11n` on a machine with internet access"
        )


# Ultralytics' own letterbox colour, so padding looks like the padding the network was trained on.
_LETTERBOX_GREY = (114, 114, 114)

# Formats whose exported graph has a fixed batch size of one and a fixed square input.
_SINGLE_IMAGE_SUFFIXES = (".tflite",)


class Detector:
    """Boxes for a batch of RGB images, in each image's own pixel coordinates."""

    def __init__(
        self,
        weights: Path,
        device: torch.device,
        image_size: int,
        min_confidence: float,
        upscale_small: bool = False,
    ) -> None:
        """Every image is letterboxed to the smallest of a fixed set of shapes it fits
        (`device_images.letterbox_shapes`: the square `image_size` and its 4:3 rectangles), as
        inference/pipeline.py does on every device (not ultralytics' tightest rectangle for a lone
        image): CPU and CUDA, one image or a batch, the network sees the same picture, and the
        calibration was fitted on it."""
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
        self.weights = weights
        self.device = device
        self.image_size = image_size
        self.min_confidence = min_confidence
        self.upscale_small = upscale_small
        # A fixed-shape graph takes neither batches nor the rectangles.
        self.rectangles = not str(weights).endswith(_SINGLE_IMAGE_SUFFIXES)
        # On a CPU a batch costs more per image than one image at a time (load-tests/runtimes.py);
        # only a GPU gains from batching here.
        self.batched = device.type == "cuda" and self.rectangles
        self.half = device.type == "cuda"

    def backend(self) -> torch.nn.Module:
        """Ultralytics' `AutoBackend` for these weights, as its predictor sets it up (the
        predict-start callbacks, such as the OpenVINO settings, applied): called on a letterboxed
        (N, 3, S, S) float batch in [0, 1], it gives the raw predictions its NMS takes."""
        if self.model.predictor is None:
            self._predict([Image.new("RGB", (self.image_size, self.image_size), _LETTERBOX_GREY)])
        return self.model.predictor.model

    def predict(self, images: list[Image.Image]) -> list[list[Box]]:
        if self.batched:
            return self._predict(images)
        return [self._predict([image])[0] for image in images]

    def _predict(self, images: list[Image.Image]) -> list[list[Box]]:
        shapes = [
            letterbox_shape(image.height, image.width, self.image_size, self.rectangles, self.upscale_small)
            for image in images
        ]
        found: list[list[Box]] = [[] for _ in images]
        for shape in dict.fromkeys(shapes):
            indices = [i for i, s in enumerate(shapes) if s == shape]
            group = [images[i] for i in indices]
            if not self.upscale_small:
                group = [self._pad_small(image, shape) for image in group]
            results = self.model.predict(
                group,
                imgsz=list(shape),
                conf=self.min_confidence,
                device=self.device,
                half=self.half,
                rect=False,
                verbose=False,
            )
            for i, result in zip(indices, results):
                found[i] = self._boxes(result, images[i].size)
        return found

    def _pad_small(self, image: Image.Image, shape: tuple[int, int]) -> Image.Image:
        """An image smaller than the network input, placed top-left on a grey canvas of its
        letterbox shape, so the letterbox does not enlarge it: YOLO was trained on objects at
        photo scale, and a 50-pixel fruit blown up to 640 pixels comes back as a "person" (measured
        in load-tests/fit_calibration.py, which compares both ways on the fitting photos)."""
        if max(image.size) >= self.image_size:
            return image
        height, width = shape
        canvas = Image.new("RGB", (width, height), _LETTERBOX_GREY)
        canvas.paste(image, (0, 0))
        return canvas

    def _boxes(self, result, size: tuple[int, int]) -> list[Box]:
        """The boxes in the image's own pixels; a box reaching into the padding is cut at the
        image's edge, and one wholly inside the padding is no box."""
        width, height = size
        boxes = result.boxes
        found = []
        for cls, conf, (x1, y1, x2, y2) in zip(
            boxes.cls.tolist(), boxes.conf.tolist(), boxes.xyxy.tolist()
        ):
            x2, y2 = min(x2, width), min(y2, height)
            if x2 > x1 and y2 > y1:
                found.append(Box(conf, x1, y1, x2 - x1, y2 - y1, class_name=self.names[int(cls)]))
        return found
