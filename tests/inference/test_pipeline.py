"""The device pipeline gives the reference's answers (`TaggingEngine.predict` on PIL images), on
the real photos of tests/photos and a sample of tests/evalset/photos, within the tolerances of
tests/inference/agreement.py (the same comparison CUDA is held to against the CPU). Both
letterbox to the detector's square input, the pipeline on the device, the reference through
ultralytics.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry, Counter
from ultralytics.nn.autobackend import AutoBackend

from inference.device_images import LETTERBOX_GREY, decode_images, letterbox_into, letterbox_shape
from inference.engine import EngineConfig, TaggingEngine
from inference.image_header import decode_with_pil
from inference.classifier import crop_and_resize
from inference.pipeline import DevicePipeline, batched_nms, same_size_groups
from inference.results import ModelError, UndecodableImage
from tests.conftest import DETECTOR_WEIGHTS, PHOTOS, SHARED_WEIGHTS
from tests.inference.agreement import CPU, HALF, Tolerance, _same_place, assert_same_answers, assert_same_tags

SAMPLE = sorted(PHOTOS.glob("*.jpg")) + sorted((PHOTOS.parent / "evalset" / "photos").glob("*.jpg"))[::40]


def reference_image(data: bytes) -> Image.Image:
    """What the gateway handed `TaggingEngine.predict` before the pipeline: PIL's upright RGB pixels."""
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
        )
    )


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [path.read_bytes() for path in SAMPLE]


def assert_same_as_the_reference(
    pipeline: DevicePipeline, reference: TaggingEngine, photos: list[bytes], tolerance: Tolerance
) -> None:
    """Every photo is compared before the test fails, listing each one that disagrees: a run on a
    lent GPU is too scarce to learn of one disagreement at a time."""
    tags = pipeline.predict(photos)
    boxes = pipeline.detect(decode_images(photos, pipeline.device))
    disagreements = []
    for path, data, found in zip(SAMPLE, photos, zip(tags, boxes)):
        image = reference_image(data)
        expected = (reference.predict([image])[0], reference.detect([image])[0])
        try:
            assert_same_answers(reference, found, expected, tolerance)
        except AssertionError as disagreement:
            disagreements.append(f"{path.name}: {str(disagreement).splitlines()[0]}")
    assert not disagreements, f"{len(disagreements)} of {len(photos)} photos disagree:\n" + "\n".join(disagreements)


def test_the_yolo_network_called_directly_gives_the_engines_tags_and_boxes(torch_engine, photos):
    assert_same_as_the_reference(DevicePipeline(torch_engine, max_batch=8), torch_engine, photos, CPU)


@pytest.mark.parametrize(("min_confidence", "max_detections"), [(0.25, 300), (0.001, 7)])
def test_one_nms_over_the_batch_keeps_what_ultralytics_keeps_image_by_image(
    torch_engine, photos, min_confidence, max_detections
):
    from ultralytics.utils.nms import non_max_suppression

    network = DevicePipeline(torch_engine).detectors[0]
    pixels = decode_images(photos[:6], torch.device("cpu"))
    letterboxed = torch.full((len(pixels), 3, 640, 640), LETTERBOX_GREY, dtype=torch.uint8)
    for canvas, image in zip(letterboxed, pixels):
        letterbox_into(canvas, image)
    with torch.inference_mode():
        predictions = network.network(letterboxed.float().div_(255))[0]
        ours = batched_nms(predictions, min_confidence, network.iou, max_detections)
        theirs = non_max_suppression(predictions, min_confidence, network.iou, max_det=max_detections)
    assert [len(rows) for rows in ours] == [len(rows) for rows in theirs]
    assert sum(len(rows) for rows in ours) > len(ours)
    if max_detections == 7:
        assert all(len(rows) == 7 for rows in ours)  # the limit applies per image
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-4)


def test_images_of_one_size_are_prepared_together_exactly_as_one_by_one(torch_engine, photos):
    pipeline = DevicePipeline(torch_engine, max_batch=8, pad_to_buckets=True)
    small = Image.open(PHOTOS / "bus.jpg").resize((320, 427))  # under the letterbox: placed, not scaled
    encoded = io.BytesIO()
    small.save(encoded, "JPEG")
    datas = [photos[0], photos[1], photos[0], encoded.getvalue(), photos[2], encoded.getvalue(), photos[0]]
    pixels = decode_images(datas, torch.device("cpu"))
    assert sorted(map(len, same_size_groups(pixels)))[-2:] == [2, 3]
    batch = pipeline.classifier_input(pixels)
    assert batch.shape[0] == 8 and not batch[7].any()
    for row, image in zip(batch, pixels):
        assert torch.equal(row, crop_and_resize(image))
    groups = pipeline.letterbox(pixels)
    assert sorted(i for group in groups for i in group.indices) == list(range(len(pixels)))
    for group in groups:
        assert len(group.batch) == pipeline.batch_size_for(len(group.indices))
        assert (group.batch[len(group.indices) :] == LETTERBOX_GREY).all()
        for letterboxed, placement, index in zip(group.batch, group.placements, group.indices):
            height, width = pixels[index].shape[-2:]
            assert letterboxed.shape[-2:] == letterbox_shape(height, width, 640)
            alone = torch.full_like(letterboxed, LETTERBOX_GREY)
            assert letterbox_into(alone, pixels[index]) == placement
            assert torch.equal(letterboxed, alone)


def test_the_comparison_catches_a_different_picture(torch_engine):
    """The tolerances are not blind: the bus photo mirrored (boxes moved, tags nearly the same)
    and the bus photo cropped (a box lost far above the threshold) both fail."""
    bus = reference_image((PHOTOS / "bus.jpg").read_bytes())
    expected = (torch_engine.predict([bus])[0], torch_engine.detect([bus])[0])
    for changed in (bus.transpose(Image.Transpose.FLIP_LEFT_RIGHT), bus.crop((0, 0, 768, 700))):
        found = (torch_engine.predict([changed])[0], torch_engine.detect([changed])[0])
        with pytest.raises(AssertionError):
            assert_same_answers(torch_engine, found, expected, HALF)


def test_an_exported_detector_runs_in_ultralytics_backend_on_our_letterbox_with_the_same_answers(engine, photos):
    """The reference runs the export through ultralytics' predictor and its own letterbox."""
    if engine.detectors[0].weights.suffix == ".pt":
        pytest.skip("no exported detector runtime (OpenVINO, ONNX Runtime) installed")
    pipeline = DevicePipeline(engine, max_batch=8)
    assert all(isinstance(d.network, AutoBackend) for d in pipeline.detectors)
    assert_same_as_the_reference(pipeline, engine, photos[:10], CPU)


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "WEBP"])
def test_other_formats_fall_back_to_pil_and_keep_their_tags(engine, image_format):
    photo = Image.open(PHOTOS / "cat_chelsea.jpg").convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
    (tags,) = DevicePipeline(engine).predict([buffer.getvalue()])
    assert_same_tags(tags, engine.predict([photo])[0], CPU)
    assert "cat" in {t.tag.key for t in tags if t.confidence > 0.6}


def test_a_corrupt_jpeg_fails_alone(engine):
    good = (PHOTOS / "cat_chelsea.jpg").read_bytes()
    results = DevicePipeline(engine).predict([good, good[:700], good])
    assert isinstance(results[1], UndecodableImage)
    assert_same_tags(results[0], engine.predict([reference_image(good)])[0], CPU)
    assert [t.tag.key for t in results[0]] == [t.tag.key for t in results[2]]


def test_header_sizes_are_checked_before_decoding(engine):
    small, large = (PHOTOS / "cat_chelsea.jpg").read_bytes(), (PHOTOS / "bus.jpg").read_bytes()
    results = DevicePipeline(engine, side_limits=(15, 720)).predict([small, large[:3000]])
    assert "cat" in {t.tag.key for t in results[0]}
    # Cut after its header: refused by its declared size, not by its missing pixels.
    assert isinstance(results[1], UndecodableImage) and "768x1024" in str(results[1])


def test_batches_run_at_bucketed_sizes_and_fixed_shapes_every_one_warmed(torch_engine):
    pipeline = DevicePipeline(torch_engine, max_batch=4, pad_to_buckets=True)
    seen: list[tuple[int, int, int]] = []
    network = pipeline.detectors[0].network
    hook = network.register_forward_pre_hook(lambda _, args: seen.append((len(args[0]), *args[0].shape[-2:])))
    landscape, portrait = (PHOTOS / "raccoon.jpg").read_bytes(), (PHOTOS / "bus.jpg").read_bytes()
    try:
        pipeline.warm_up()
        shapes = [(640, 640), (480, 640), (640, 480)]
        assert sorted(seen) == sorted((n, *shape) for shape in shapes for n in (1, 2, 4))
        seen.clear()
        results = pipeline.predict([landscape, portrait, landscape])
        assert seen == [(2, 480, 640), (1, 640, 480)]  # one batch per shape, each at its bucket
        seen.clear()
        assert len(pipeline.predict([landscape] * 5)) == 5
        assert seen == [(4, 480, 640), (1, 480, 640)]  # more than the largest bucket: run in parts
        seen.clear()
        assert len(pipeline.detect(decode_images([landscape] * 5, pipeline.device))) == 5
        assert seen == [(4, 480, 640), (1, 480, 640)]
    finally:
        hook.remove()
    for result, data in zip(results, [landscape, portrait, landscape]):
        assert_same_tags(result, torch_engine.predict([reference_image(data)])[0], CPU)


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


def test_replicas_share_the_weights_and_serve_side_by_side_with_the_same_answers(torch_engine):
    """Two threads, one on landscape photos and one on portrait ones, each on its own replica: a
    YOLO head caches its anchors for the last shape it saw, so a shared one would mix them up."""
    registry = CollectorRegistry()
    failed = Counter("imagetag_failed_batches", "batches retried image by image", registry=registry)
    pipeline = DevicePipeline(torch_engine, max_batch=4, failed_batches=failed)
    twin = pipeline.replica()
    assert twin is not None and twin.engine is pipeline.engine
    assert twin.detectors[0].network is not pipeline.detectors[0].network
    landscape, portrait = [(PHOTOS / "raccoon.jpg").read_bytes()] * 2, [(PHOTOS / "bus.jpg").read_bytes()] * 2
    expected = {id(landscape): pipeline.predict(landscape), id(portrait): pipeline.predict(portrait)}
    start = threading.Barrier(2)

    def serve(replica: DevicePipeline, photos: list[bytes]) -> list:
        start.wait()
        return [replica.predict(photos) for _ in range(6)]

    with ThreadPoolExecutor(2) as threads:
        served = {id(photos): threads.submit(serve, replica, photos) for replica, photos in ((pipeline, landscape), (twin, portrait))}
    for key, rounds in served.items():
        for results in rounds.result():
            for result, reference in zip(results, expected[key]):
                assert_same_tags(result, reference, CPU)
    assert registry.get_sample_value("imagetag_failed_batches_total") == 0


def test_models_on_a_runtime_that_cannot_be_shared_get_no_replica(engine):
    if engine.classifier.runtime == "torch" and all(d.weights.suffix == ".pt" for d in engine.detectors):
        pytest.skip("no ONNX or OpenVINO runtime installed: every model here is shareable")
    assert DevicePipeline(engine).replica() is None


def test_a_tflite_detector_serves_through_ultralytics_backend():
    """A fixed-shape int8 TFLite graph: ultralytics' backend quantises and scales its boxes."""
    engine = TaggingEngine.build(
        EngineConfig(detector_weights=(SHARED_WEIGHTS / "yolov8n_int8.tflite",), device="cpu", torch_threads=2)
    )
    pipeline = DevicePipeline(engine)
    assert isinstance(pipeline.detectors[0].network, AutoBackend)
    photos = [(PHOTOS / name).read_bytes() for name in ("bus.jpg", "cat_chelsea.jpg")]
    assert_same_as_the_reference(pipeline, engine, photos, CPU)
    bus = {t.tag.key: t for t in pipeline.predict(photos[:1])[0]}["bus"]
    assert bus.confidence > 0.6 and len(bus.instances) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tags_and_boxes_match_the_cpu_reference(torch_engine, photos):
    cuda_engine = TaggingEngine.build(EngineConfig(detector_weights=(DETECTOR_WEIGHTS,), device="cuda"))
    pipeline = DevicePipeline(cuda_engine, max_batch=16)
    pipeline.warm_up()
    assert_same_as_the_reference(pipeline, torch_engine, photos, HALF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_replicas_on_streams_of_their_own_answer_side_by_side_as_one_alone(photos):
    """Each replica waits on its own stream only; nothing of one may leak into the other's batch."""
    pipeline = DevicePipeline.build(EngineConfig(detector_weights=(DETECTOR_WEIGHTS,), device="cuda"), max_batch=8)
    twin = pipeline.replica()
    assert twin is not None and twin.stream != pipeline.stream
    halves = photos[: len(photos) // 2], photos[len(photos) // 2 :]
    alone = [pipeline.predict(half) for half in halves]
    with ThreadPoolExecutor(2) as threads:
        side_by_side = [
            threads.submit(lambda replica, half: [replica.predict(half) for _ in range(3)], replica, half)
            for replica, half in zip((pipeline, twin), halves)
        ]
    for expected, rounds in zip(alone, side_by_side):
        for results in rounds.result():
            for result, reference in zip(results, expected):
                assert_same_tags(result, reference, HALF)


def test_a_large_photo_decoded_reduced_gives_the_photos_tags_and_boxes_in_its_own_pixels(torch_engine):
    """bus.jpg (768x1024) enlarged twice: decoded at half size, it is the photo again, so it gets
    the photo's tags, and its boxes are the photo's, twice as large."""
    bus = Image.open(PHOTOS / "bus.jpg")
    encoded = io.BytesIO()
    bus.resize((1536, 2048), Image.Resampling.BICUBIC).save(encoded, "JPEG", quality=95)
    pipeline = DevicePipeline(torch_engine, max_batch=8)
    small, large = pipeline.predict([(PHOTOS / "bus.jpg").read_bytes(), encoded.getvalue()])
    assert_same_tags(large, small, HALF)
    placed = Tolerance(tag=HALF.tag, box_pixels=8.0, iou=0.85, score=HALF.score)
    boxes = {tag.tag.key: tag.instances for tag in small}
    for tag in large:
        for instance in tag.instances:
            halved = dataclasses.replace(
                instance, x=instance.x / 2, y=instance.y / 2, width=instance.width / 2, height=instance.height / 2
            )
            assert any(_same_place(halved, other, placed) for other in boxes[tag.tag.key]), (tag.tag.key, instance)
    assert sum(len(tag.instances) for tag in large) == sum(len(tag.instances) for tag in small) > 0
