"""Image bytes to tags with the pixels kept on the models' device.

`DevicePipeline.predict(list of bytes)` gives one result per image, like `TaggingEngine.predict`:
its tags (the same `ScoredTag` lists `fuse()` makes) or the error for that image alone. Per batch:
JPEGs decoded on the device together, other formats by PIL (inference/device_images.py); the
classifier's crop and resize and the detector's letterbox made there; both models on the one
batch (half precision on CUDA); NMS there over the whole batch; one transfer back for fusion.

Stalls it avoids: every new input shape costs each convolution a cuDNN execution plan (built once
per shape, then cached), so batches run only at bucketed sizes (`bucket_sizes`: 1, 2, 4, 8, then
every eighth of `max_batch`, padded with blank images) and at three letterbox shapes, and
`warm_up()` runs every bucket at every shape once at start. A batch that fails is logged and
counted before its images are retried one by one, so it shows up as an error, not as slowness.

A pipeline serves one thread. `replica()` gives another over the same weights for another
thread, with its own detector copy and CUDA stream, so that one replica's CPU work (decode
set-up, boxes, fusion) overlaps another's kernels; the embedded batcher and `imagetag worker`
run `IMAGETAG_MODEL_REPLICAS` of them.

Ultralytics' predictor (which letterboxes on the CPU, one image at a time) is not on this path:
`.pt` detectors run their network directly; exported ones (ONNX, OpenVINO, TFLite) run through
the `AutoBackend` ultralytics loaded them into, on the letterbox made here.

The letterbox is the smallest of three fixed shapes an image fits (the square input and its 4:3
landscape and portrait, `device_images.letterbox_shapes`; the square alone for a fixed-shape
TFLite graph), on every device, so CPU and CUDA see the same picture and their boxes agree;
`TaggingEngine` (through ultralytics' predictor, the reference the tests hold this module to) pads
the same way, and the shipped calibration was fitted on it (load-tests/fit_calibration.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch
import torchvision
from PIL import Image

from inference.classifier import CROP_PADDING, INPUT_SIZE, crop_and_resize, normalize
from inference.client import FailureCounter
from inference.detector import Detector
from inference.device_images import (
    LETTERBOX_GREY,
    Decoded,
    Placement,
    decode_for_models,
    decode_images,
    letterbox_into,
    letterbox_shape,
    letterbox_shapes,
)
from inference.engine import EngineConfig, TaggingEngine, run_or_retry_each
from inference.fusion import fuse
from inference.image_header import ImageRejected, ModelInput
from inference.results import Box, ScoredTag, TagResult, UndecodableImage

log = logging.getLogger(__name__)

T = TypeVar("T")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below a step of an eighth of `max_batch` (at least 8), then every step, and
    `max_batch` itself: (1, 2, 4, 8, 16, 24, ..., 64) for 64.

    Fine steps because a GPU worker's rounds are rarely full below its top load: holding three
    rounds, at 128 requests in flight it reads about 43 images a round, which powers of two pad to
    64 rows for both models and eighths to 48. Each size is one more shape to warm at start."""
    step = max(8, max_batch // 8)
    sizes = []
    size = 1
    while size < min(step, max_batch):
        sizes.append(size)
        size *= 2
    sizes += range(step, max_batch, step)
    return (*sizes, max_batch)


def bucket_for(count: int, buckets: tuple[int, ...]) -> int:
    return next(size for size in buckets if size >= count)


def in_parts(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` cut into consecutive runs of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def same_size_groups(images: list[torch.Tensor]) -> list[list[int]]:
    """The images' indices, grouped by (height, width). A group is cropped, resized and
    letterboxed in one call: on a GPU each call is launch-bound, so a group of photos of one camera
    costs about what one photo does (image by image, the two took 17 ms of a batch of 128 on an
    H200, more than the detector's 24)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return list(groups.values())


class Letterboxed(NamedTuple):
    """Images of one letterbox shape, as the detector takes them."""

    indices: list[int]
    """Which of the batch's images, in the order of `batch`'s rows."""
    batch: torch.Tensor
    """(bucket, 3, H, W) uint8, grey rows padding it to its bucket."""
    placements: list[Placement]


class YoloNetwork:
    """A detector's network called directly on a letterboxed batch on the device, with one NMS
    over the batch (`batched_nms`) at ultralytics' predictor's settings (IoU, max detections).

    `.pt` weights: the fused network itself (half precision on CUDA). Any other format
    (ONNX, OpenVINO, TFLite): the `AutoBackend` ultralytics' predictor loaded it into, our
    OpenVINO settings applied, so ultralytics stays the loader and runtime while the letterbox is
    this module's, the same for every format."""

    def __init__(self, detector: Detector, device: torch.device) -> None:
        from ultralytics.utils import DEFAULT_CFG

        self.names = detector.names
        self.rectangles = detector.rectangles
        self.shapes = letterbox_shapes(detector.image_size, detector.rectangles)
        self.min_confidence = detector.min_confidence
        self.iou = DEFAULT_CFG.iou
        self.max_detections = DEFAULT_CFG.max_det
        if detector.weights.suffix == ".pt":
            self.dtype = torch.float16 if device.type == "cuda" else torch.float32
            # Channels last, as the classifier runs: on the development CPU the network took 41-44 ms
            # for a 640x480 photo against 56 ms in the default layout, its outputs within 0.002.
            self.memory_format = torch.channels_last
            # A copy: ultralytics' predictor fuses and casts the module it holds in place.
            network = copy.deepcopy(detector.model.model).fuse(verbose=False)
            self.network = network.to(device, self.dtype, memory_format=self.memory_format).eval()
        else:
            self.dtype = torch.float32  # the backend casts to what its graph takes
            self.memory_format = torch.contiguous_format  # and reads the tensor as NCHW numpy
            self.network = network = detector.backend()
        # NMS-free heads (YOLO26, YOLOv10) already give (x1, y1, x2, y2, score, class) rows;
        # ultralytics' NMS then only applies the score threshold, as its predictor does.
        self.end2end = bool(getattr(network, "end2end", False))

    def network_input(self, letterboxed: torch.Tensor) -> torch.Tensor:
        """An (N, 3, H, W) uint8 letterboxed batch as the network takes it: 0..1, in its dtype and
        memory format."""
        return letterboxed.to(self.dtype, memory_format=self.memory_format).div_(255)

    @torch.inference_mode()
    def detections(self, letterboxed: torch.Tensor) -> list[torch.Tensor]:
        """Per image of an (N, 3, H, W) uint8 batch, an (n, 6) tensor on the device: x1, y1, x2, y2
        in letterbox pixels, score, class."""
        output = self.network(self.network_input(letterboxed))
        predictions = output[0] if isinstance(output, (tuple, list)) else output
        if self.end2end:
            from ultralytics.utils.nms import non_max_suppression

            return non_max_suppression(
                predictions, self.min_confidence, self.iou, max_det=self.max_detections, end2end=True
            )
        return batched_nms(predictions, self.min_confidence, self.iou, self.max_detections)


# Wider than any box in a letterbox: boxes of different images or classes, moved this far apart
# for each, never overlap (ultralytics' own class offset).
_GROUP_OFFSET = 7680.0


def batched_nms(
    predictions: torch.Tensor, min_confidence: float, iou: float, max_detections: int
) -> list[torch.Tensor]:
    """What ultralytics' `non_max_suppression` gives (best class per box, NMS per class, at most
    `max_detections` per image, highest score first) for a (N, 4 + classes, anchors) YOLO output,
    in one NMS call over the whole batch: ultralytics loops over the images in Python, which at
    batch 128 on an H200 cost more than the detector itself (42 ms against 24; gpu_pipeline.py
    --breakdown). Boxes are offset per (image, class) in float64, where offsets this large keep
    every coordinate exact; in float16 they would not even be finite."""
    batch, channels, _ = predictions.shape
    classes = channels - 4
    scores, labels = predictions[:, 4:].max(dim=1)
    image, anchor = (scores > min_confidence).nonzero(as_tuple=True)
    centre_size = predictions[image, :4, anchor].double()
    corners = torch.cat([centre_size[:, :2] - centre_size[:, 2:] / 2, centre_size[:, :2] + centre_size[:, 2:] / 2], 1)
    score, label = scores[image, anchor], labels[image, anchor]
    group = (image * classes + label).double()
    keep = torchvision.ops.nms(corners + group[:, None] * _GROUP_OFFSET, score.double(), iou)
    # NMS keeps the highest scores first; a stable sort by image keeps that order within each.
    keep = keep[torch.sort(image[keep], stable=True).indices]
    kept_image = image[keep]
    counts = torch.bincount(kept_image, minlength=batch)
    first_of_image = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep), device=keep.device) - first_of_image[kept_image]
    keep = keep[rank < max_detections]
    rows = torch.cat([corners[keep].float(), score[keep, None].float(), label[keep, None].float()], 1)
    return list(rows.split(counts.clamp(max=max_detections).tolist()))


class DevicePipeline:
    """Image bytes to tags for a built `TaggingEngine`, on the engine's device."""

    def __init__(
        self,
        engine: TaggingEngine,
        max_batch: int = 64,
        failed_batches: FailureCounter | None = None,
        pad_to_buckets: bool | None = None,
        side_limits: tuple[int, int] | None = None,
    ) -> None:
        """`pad_to_buckets`, None: on CUDA only. A CPU pays little for a new shape, and a
        padded image costs it as much as a real one. `side_limits`: (shortest side at least,
        longest side at most), checked on each header before its pixels are decoded; the
        gateway checks them too, this keeps a pipeline fed from elsewhere safe."""
        self.engine = engine
        self.device = engine.classifier.device
        self.buckets = bucket_sizes(max_batch)
        self.pad_to_buckets = self.device.type == "cuda" if pad_to_buckets is None else pad_to_buckets
        self.failed_batches = failed_batches
        self.side_limits = side_limits
        self.detectors = [YoloNetwork(detector, self.device) for detector in engine.detectors]
        self.letterbox_size = engine.detectors[0].image_size if engine.detectors else 640
        self.model_input = ModelInput(self.letterbox_size, INPUT_SIZE + CROP_PADDING)
        # Replicas on threads of their own each queue on a stream of their own: one's wait for its
        # results (NMS's count, the copy back) then waits for its own kernels only, and its CPU
        # work (decode set-up, boxes, fusion) overlaps the other's kernels.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        max_batch: int = 64,
        failed_batches: FailureCounter | None = None,
        side_limits: tuple[int, int] | None = None,
    ) -> DevicePipeline:
        """The engine's models behind a pipeline, every bucket warmed."""
        engine = TaggingEngine.build(config, failed_batches, warm=False)
        pipeline = cls(engine, max_batch, failed_batches, side_limits=side_limits)
        started = time.monotonic()
        pipeline.warm_up()
        padding = f", padded to {', '.join(map(str, pipeline.buckets))}" if pipeline.pad_to_buckets else ""
        log.info("serving on %s: batches of up to %d images%s; warmed in %.1f s", pipeline.device, max_batch, padding,
                 time.monotonic() - started)
        return pipeline

    def replica(self) -> DevicePipeline | None:
        """Another pipeline over the same weights, warmed, for a thread of its own; None where the
        models cannot be shared between threads (an ONNX or OpenVINO classifier, an exported
        detector: build another engine then). The classifier's network is shared as it is; each
        detector's is copied, since a YOLO head caches its anchors for the last input shape it saw.
        On an H200 an embedded service with two engines held 2,138 MB, a worker with one 1,747."""
        shareable = self.engine.classifier.runtime == "torch" and all(
            detector.weights.suffix == ".pt" for detector in self.engine.detectors
        )
        if not shareable:
            return None
        twin = DevicePipeline(self.engine, self.buckets[-1], self.failed_batches, self.pad_to_buckets, self.side_limits)
        twin.warm_up()
        return twin

    def _on_own_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def batch_size_for(self, count: int) -> int:
        """The batch size `count` images run at."""
        return bucket_for(count, self.buckets) if self.pad_to_buckets else count

    def warm_up(self) -> None:
        """Runs every bucket at every letterbox shape once, so no request pays for a first-time
        shape (cuDNN's plans, lazily loaded kernels) or for nvJPEG's setup."""
        shapes = dict.fromkeys(shape for network in self.detectors for shape in network.shapes)
        for height, width in shapes or [(self.letterbox_size, self.letterbox_size)]:
            # A quarter larger than its letterbox, so the resize kernels load now too.
            grey = Image.new("RGB", (width * 5 // 4, height * 5 // 4), (127, 127, 127))
            encoded = io.BytesIO()
            grey.save(encoded, "JPEG")
            with self._on_own_stream():
                (pixels,) = decode_images([encoded.getvalue()], self.device)
                for size in self.buckets if self.pad_to_buckets else (1,):
                    self._run_batch([pixels] * size)

    def predict(self, datas: list[bytes]) -> list[TagResult]:
        """One result per image, in order; batches longer than the largest bucket run in parts."""
        with self._on_own_stream():
            return [result for part in in_parts(datas, self.buckets[-1]) for result in self._predict_part(part)]

    def _predict_part(self, datas: list[bytes]) -> list[TagResult]:
        decoded = decode_for_models(datas, self.device, self.side_limits, self.model_input)
        results: list[TagResult | None] = [
            UndecodableImage(str(image)) if isinstance(image, ImageRejected) else None for image in decoded
        ]
        ready = [i for i, result in enumerate(results) if result is None]
        for i, tags in zip(ready, self.predict_pixels([decoded[i].pixels for i in ready])):
            results[i] = _in_image_pixels(tags, decoded[i])
        return results

    def predict_pixels(self, pixels: list[torch.Tensor]) -> list[TagResult]:
        """Tags for decoded (3, H, W) uint8 RGB images on the device. A failed batch is logged and
        counted, then retried image by image."""
        if len(pixels) > self.buckets[-1]:
            return [result for part in in_parts(pixels, self.buckets[-1]) for result in self.predict_pixels(part)]
        if not pixels:
            return []
        return run_or_retry_each(pixels, self._run_batch, self.failed_batches)

    @torch.inference_mode()
    def _run_batch(self, pixels: list[torch.Tensor]) -> list[list[ScoredTag]]:
        logits = self.engine.classifier.logits(normalize(self.classifier_input(pixels)))
        boxes = self.detect(pixels)
        probabilities = logits[: len(pixels)].float().softmax(dim=-1).cpu().numpy()
        engine = self.engine
        return [
            fuse(engine.vocabulary, p, b, engine.detector_keys, engine.calibration)
            for p, b in zip(probabilities, boxes)
        ]

    def classifier_input(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The classifier's (bucket, 3, 260, 260) uint8 batch: each image centre-cropped and
        resized, blank rows padding it to its bucket."""
        batch = torch.zeros(
            (self.batch_size_for(len(pixels)), 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8, device=self.device
        )
        for indices in same_size_groups(pixels):
            if len(indices) == 1:
                batch[indices[0]] = crop_and_resize(pixels[indices[0]])
            else:
                batch[indices] = crop_and_resize(torch.stack([pixels[i] for i in indices]))
        return batch

    def letterbox(self, pixels: list[torch.Tensor], rectangles: bool = True) -> list[Letterboxed]:
        """The images, grouped by letterbox shape (`device_images.letterbox_shape`; the square
        alone without `rectangles`), each group a (bucket, 3, H, W) uint8 batch, grey where no
        image is, with where each image sits in it."""
        size = self.letterbox_size
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(pixels):
            height, width = image.shape[-2:]
            by_shape.setdefault(letterbox_shape(height, width, size, rectangles), []).append(index)
        return [self._letterbox_group(pixels, indices, shape) for shape, indices in by_shape.items()]

    def _letterbox_group(self, images: list[torch.Tensor], indices: list[int], shape: tuple[int, int]) -> Letterboxed:
        pixels = [images[i] for i in indices]
        canvas = torch.full(
            (self.batch_size_for(len(pixels)), 3, *shape), LETTERBOX_GREY, dtype=torch.uint8, device=self.device
        )
        placed: dict[int, Placement] = {}
        for same_size in same_size_groups(pixels):
            if len(same_size) == 1:
                placed[same_size[0]] = letterbox_into(canvas[same_size[0]], pixels[same_size[0]])
                continue
            # Indexed by a list, the canvas gives a copy, not a view: fill one, then put it back.
            group = torch.full((len(same_size), 3, *shape), LETTERBOX_GREY, dtype=torch.uint8, device=self.device)
            placement = letterbox_into(group, torch.stack([pixels[i] for i in same_size]))
            canvas[same_size] = group
            placed.update(dict.fromkeys(same_size, placement))
        return Letterboxed(indices, canvas, [placed[i] for i in range(len(pixels))])

    @torch.inference_mode()
    def detect(self, pixels: list[torch.Tensor]) -> list[list[Box]]:
        """Every detector's boxes for each decoded image, in its own pixels."""
        if len(pixels) > self.buckets[-1]:
            return [boxes for part in in_parts(pixels, self.buckets[-1]) for boxes in self.detect(part)]
        found: list[list[Box]] = [[] for _ in pixels]
        letterboxes: dict[bool, list[Letterboxed]] = {}
        for network in self.detectors:
            if network.rectangles not in letterboxes:
                letterboxes[network.rectangles] = self.letterbox(pixels, network.rectangles)
            for group in letterboxes[network.rectangles]:
                per_image = self._detections(network, group.batch)[: len(group.indices)]
                # One transfer per group: a copy per image would wait on the device each time.
                rows = torch.cat(per_image).cpu().split([len(d) for d in per_image])
                for index, image_rows, placement in zip(group.indices, rows, group.placements):
                    found[index].extend(_boxes(image_rows, placement, network.names))
        return found

    def _detections(self, network: YoloNetwork, batch: torch.Tensor) -> list[torch.Tensor]:
        # Unpadded (a CPU), the network takes one image per call: CPU convolutions cost more per
        # image in a batch (README, Runtimes: 116 against 84 ms for YOLOv8n in PyTorch). With
        # fixed shapes (a GPU) the whole bucket goes at once.
        per_call = len(batch) if self.pad_to_buckets else 1
        return [rows for part in in_parts(batch, per_call) for rows in network.detections(part)]


def _in_image_pixels(result: TagResult, decoded: Decoded) -> TagResult:
    """Boxes found on reduced pixels, in the image's own."""
    height, width = decoded.pixels.shape[-2:]
    if isinstance(result, Exception) or (width, height) == (decoded.width, decoded.height):
        return result
    sx, sy = decoded.width / width, decoded.height / height
    return [
        dataclasses.replace(
            tag,
            instances=tuple(
                dataclasses.replace(i, x=i.x * sx, y=i.y * sy, width=i.width * sx, height=i.height * sy)
                for i in tag.instances
            ),
        )
        for tag in result
    ]


def _boxes(rows: torch.Tensor, placement: Placement, names: dict[int, str]) -> list[Box]:
    """Detections in the image's own pixels; one lying wholly in the padding is no box."""
    found = []
    for x1, y1, x2, y2, score, cls in rows.tolist():
        x1, y1, x2, y2 = placement.to_image(x1, y1, x2, y2)
        if x2 > x1 and y2 > y1:
            found.append(Box(score, x1, y1, x2 - x1, y2 - y1, class_name=names[int(cls)]))
    return found
