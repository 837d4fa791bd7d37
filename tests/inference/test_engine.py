"""The real models on real photos."""

import logging
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, Counter

from inference.detector import Detector, DetectorLoadError
from inference.engine import ModelError, TaggingEngine
from tests.conftest import PHOTOS, SHARED_WEIGHTS, ultralytics_asset


def rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def test_bus_photo_has_a_bus_and_four_people(engine):
    (tags,) = engine.predict([rgb(ultralytics_asset("bus.jpg"))])
    found = {t.tag.key: t for t in tags}
    assert found["bus"].confidence > 0.6
    assert len(found["bus"].instances) == 1
    assert len(found["person"].instances) >= 4
    width, height = 810, 1080
    for box in found["person"].instances:
        assert 0 <= box.x < width and 0 <= box.y < height
        assert box.x + box.width <= width + 1 and box.y + box.height <= height + 1


def test_batch_gives_each_image_its_own_tags(engine):
    images = [rgb(PHOTOS / name) for name in ("cat_chelsea.jpg", "bus.jpg", "coffee.jpg")]
    batched = engine.predict(images)
    single = [engine.predict([image])[0] for image in images]
    for together, alone in zip(batched, single):
        # Batching pads images differently, so scores may move a little and near-ties reorder.
        confident = {t.tag.key: t.confidence for t in alone if t.confidence > 0.3}
        assert confident
        found = {t.tag.key: t.confidence for t in together}
        for key, confidence in confident.items():
            assert found[key] == pytest.approx(confidence, abs=0.03)


def test_one_bad_image_does_not_fail_its_neighbours(engine):
    good = rgb(PHOTOS / "cat_chelsea.jpg")
    broken = Image.new("L", (64, 64))  # one channel: the classifier cannot take it
    results = engine.predict([good, broken, good])
    assert isinstance(results[1], ModelError)
    assert [t.tag.key for t in results[0][:3]] == [t.tag.key for t in results[2][:3]]
    assert "cat" in {t.tag.key for t in results[0]}


def test_a_failed_batch_is_logged_and_counted_before_the_retry(engine, caplog):
    registry = CollectorRegistry()
    failed = Counter("imagetag_failed_batches", "batches retried image by image", registry=registry)
    counted = TaggingEngine(engine.vocabulary, engine.classifier, engine.detectors, engine.calibration, failed)
    good = Image.open(PHOTOS / "cat_chelsea.jpg").convert("RGB")
    with caplog.at_level(logging.ERROR, logger="inference.engine"):
        results = counted.predict([good, Image.new("L", (64, 64)), good])
    assert isinstance(results[1], ModelError)
    assert registry.get_sample_value("imagetag_failed_batches_total") == 1
    assert "a batch of 3 images failed" in caplog.text


def test_tflite_export_detects_the_same_things(engine):
    import torch

    detector = Detector(SHARED_WEIGHTS / "yolov8n_int8.tflite", torch.device("cpu"), 640, 0.25)
    boxes = detector.predict([rgb(ultralytics_asset("bus.jpg")), rgb(ultralytics_asset("zidane.jpg"))])
    assert {b.class_name for b in boxes[0]} >= {"bus", "person"}
    assert sum(b.class_name == "person" for b in boxes[0]) >= 4
    assert sum(b.class_name == "person" for b in boxes[1]) == 2


def test_missing_or_broken_weights_fail_clearly(tmp_path):
    import torch

    with pytest.raises(DetectorLoadError, match="not found"):
        Detector(tmp_path / "nope.pt", torch.device("cpu"), 640, 0.25)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorLoadError, match="junk.pt: corrupt or truncated: not a PyTorch archive"):
        Detector(junk, torch.device("cpu"), 640, 0.25)
    sound_archive_of_nothing = tmp_path / "empty.pt"  # passes the cheap look; only loading tells
    with zipfile.ZipFile(sound_archive_of_nothing, "w") as archive:
        archive.writestr("empty/data.pkl", b"")
    with pytest.raises(DetectorLoadError, match="cannot load"):
        Detector(sound_archive_of_nothing, torch.device("cpu"), 640, 0.25)
