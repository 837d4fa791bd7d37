"""The device pipeline gives the reference's answers (`TaggingEngine.predict` on PIL images).

Tolerances, on the real photos of tests/photos and a sample of tests/evalset/photos:
- tags: the same keys above 5 %, confidences within 0.02 (CUDA fp16 against the CPU: 0.03);
- boxes: same class, corners within 3 px, raw score within 0.02 (CUDA fp16: 5 px, 0.03); a box
  may be missing or extra only if its score is that close to the detector's threshold.
Measured on the CPU: tags within 0.005, boxes within 2.1 px (most under 1 px), scores within 0.006.
The reference detector letterboxes to the square input here, as the pipeline does on every
device (`EngineConfig.detector_square_letterbox`); against ultralytics' tight rectangle for a
lone image (the engine's CPU default) a tag moved by up to 0.07 on these photos: a different
picture for the network, not a different computation.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry, Counter

from inference.detector import Box, Detector
from inference.device_images import decode_images
from inference.engine import EngineConfig, ModelError, TaggingEngine
from inference.image_header import decode_with_pil
from inference.pipeline import DevicePipeline
from inference.results import UndecodableImage
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS

TAG_FLOOR = 0.05
TAG_TOLERANCE = 0.02
BOX_PIXELS = 3.0
SCORE_TOLERANCE = 0.02
HALF_TAG_TOLERANCE = 0.03
# float16 box coordinates step by 0.5 px near the letterbox's far edge, 0.8 px once mapped back
# onto a 1024-pixel photo.
HALF_BOX_PIXELS = 5.0
HALF_SCORE_TOLERANCE = 0.03
SAMPLE = sorted(PHOTOS.glob("*.jpg")) + sorted((PHOTOS.parent / "evalset" / "photos").glob("*.jpg"))[::40]


def reference_image(data: bytes) -> Image.Image:
    """What the gateway hands `TaggingEngine.predict` today: PIL's upright RGB pixels."""
    return decode_with_pil(data)


@pytest.fixture(scope="module")
def torch_engine() -> TaggingEngine:
    """Both models in PyTorch on the CPU, float32: the pipeline calls the YOLO network itself,
    and on a CUDA machine this stays the reference."""
    return TaggingEngine.build(
        EngineConfig(
            detector_weights=(DETECTOR_WEIGHTS,),
            device="cpu",
            torch_threads=2,
            classifier_runtime="torch",
            detector_runtime="torch",
            detector_square_letterbox=True,
        )
    )


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [path.read_bytes() for path in SAMPLE]


def assert_same_tags(found, expected, tolerance: float = TAG_TOLERANCE) -> None:
    assert not isinstance(found, ModelError), found
    got = {t.tag.key: t.confidence for t in found}
    want = {t.tag.key: t.confidence for t in expected}
    keys = {k for k, c in got.items() if c > TAG_FLOOR} | {k for k, c in want.items() if c > TAG_FLOOR}
    for key in keys:
        assert key in got and key in want, key
        assert got[key] == pytest.approx(want[key], abs=tolerance), key


def assert_same_boxes(
    found: list[Box],
    expected: list[Box],
    threshold: float,
    pixels: float = BOX_PIXELS,
    score_tolerance: float = SCORE_TOLERANCE,
) -> None:
    unmatched = list(expected)
    for box in found:
        match = next(
            (b for b in unmatched if b.class_name == box.class_name and _corner_distance(b, box) <= pixels),
            None,
        )
        if match is None:
            assert box.confidence < threshold + score_tolerance, f"extra {box}"
            continue
        unmatched.remove(match)
        assert box.confidence == pytest.approx(match.confidence, abs=score_tolerance)
    for box in unmatched:
        assert box.confidence < threshold + score_tolerance, f"missing {box}"


def _corner_distance(a: Box, b: Box) -> float:
    return max(
        abs(a.x - b.x), abs(a.y - b.y), abs(a.x + a.width - b.x - b.width), abs(a.y + a.height - b.y - b.height)
    )


def test_the_yolo_network_called_directly_gives_the_engines_tags_and_boxes(torch_engine, photos):
    pipeline = DevicePipeline(torch_engine, max_batch=8)
    results = pipeline.predict(photos)
    images = [reference_image(data) for data in photos]
    for result, image in zip(results, images):
        assert_same_tags(result, torch_engine.predict([image])[0])
    decoded = decode_images(photos[:8], pipeline.device)
    threshold = torch_engine.detectors[0].min_confidence
    for found, expected in zip(pipeline.detect(decoded), torch_engine.detect(images[:8])):
        assert_same_boxes(found, expected, threshold)


def test_an_exported_detector_runs_through_ultralytics_with_the_same_tags(engine, photos):
    if engine.detectors[0].weights.suffix == ".pt":
        pytest.skip("no exported detector runtime (OpenVINO, ONNX Runtime) installed")
    pipeline = DevicePipeline(engine, max_batch=8)
    assert all(isinstance(d, Detector) for d in pipeline.detectors)
    for result, data in zip(pipeline.predict(photos[:10]), photos[:10]):
        assert_same_tags(result, engine.predict([reference_image(data)])[0])


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "WEBP"])
def test_other_formats_fall_back_to_pil_and_keep_their_tags(engine, image_format):
    photo = Image.open(PHOTOS / "cat_chelsea.jpg").convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
    (tags,) = DevicePipeline(engine).predict([buffer.getvalue()])
    assert_same_tags(tags, engine.predict([photo])[0])
    assert "cat" in {t.tag.key for t in tags if t.confidence > 0.6}


def test_a_corrupt_jpeg_fails_alone(engine):
    good = (PHOTOS / "cat_chelsea.jpg").read_bytes()
    results = DevicePipeline(engine).predict([good, good[:700], good])
    assert isinstance(results[1], UndecodableImage)
    assert_same_tags(results[0], engine.predict([reference_image(good)])[0])
    assert [t.tag.key for t in results[0]] == [t.tag.key for t in results[2]]


def test_header_sizes_are_checked_before_decoding(engine):
    small, large = (PHOTOS / "cat_chelsea.jpg").read_bytes(), (PHOTOS / "bus.jpg").read_bytes()
    results = DevicePipeline(engine, side_limits=(15, 720)).predict([small, large[:3000]])
    assert "cat" in {t.tag.key for t in results[0]}
    # Cut after its header: refused by its declared size, not by its missing pixels.
    assert isinstance(results[1], UndecodableImage) and "768x1024" in str(results[1])


def test_a_batch_of_three_runs_as_four_and_every_bucket_is_warmed(torch_engine, photos):
    pipeline = DevicePipeline(torch_engine, max_batch=4, pad_to_buckets=True)
    seen: list[int] = []
    hook = pipeline.detectors[0].network.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    try:
        pipeline.warm_up()
        assert sorted(set(seen)) == [1, 2, 4]
        seen.clear()
        results = pipeline.predict(photos[:3])
        assert seen == [4]
        seen.clear()
        assert len(pipeline.predict(photos[:5])) == 5
        assert seen == [4, 1]  # more than the largest bucket: run in parts, never a new shape
    finally:
        hook.remove()
    assert len(results) == 3
    for result, data in zip(results, photos[:3]):
        assert_same_tags(result, torch_engine.predict([reference_image(data)])[0])


def test_a_failed_batch_is_logged_and_counted_before_the_retry(engine, caplog):
    registry = CollectorRegistry()
    failed = Counter("imagetag_failed_batches", "batches retried image by image", registry=registry)
    pipeline = DevicePipeline(engine, failed_batches=failed)
    good = decode_images([(PHOTOS / "cat_chelsea.jpg").read_bytes()], pipeline.device)[0]
    four_channels = torch.cat([good, good[:1]])  # RGBA-like pixels the models cannot take
    with caplog.at_level(logging.ERROR, logger="inference.pipeline"):
        results = pipeline.predict_pixels([good, four_channels, good])
    assert isinstance(results[1], ModelError)
    assert "cat" in {t.tag.key for t in results[0]} and "cat" in {t.tag.key for t in results[2]}
    assert registry.get_sample_value("imagetag_failed_batches_total") == 1
    assert "a batch of 3 images failed" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tags_and_boxes_match_the_cpu_reference(torch_engine, photos):
    cuda_engine = TaggingEngine.build(
        EngineConfig(detector_weights=(DETECTOR_WEIGHTS,), device="cuda", detector_square_letterbox=True)
    )
    pipeline = DevicePipeline(cuda_engine, max_batch=16)
    pipeline.warm_up()
    images = [reference_image(data) for data in photos]
    for result, image in zip(pipeline.predict(photos), images):
        assert_same_tags(result, torch_engine.predict([image])[0], HALF_TAG_TOLERANCE)
    decoded = decode_images(photos[:16], pipeline.device)
    threshold = cuda_engine.detectors[0].min_confidence
    for found, expected in zip(pipeline.detect(decoded), torch_engine.detect(images[:16])):
        assert_same_boxes(found, expected, threshold, HALF_BOX_PIXELS, HALF_SCORE_TOLERANCE)
