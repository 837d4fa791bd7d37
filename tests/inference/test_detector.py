"""Small images reach the detector at their own size, padded, not enlarged (see the calibration fit)."""

import pytest
from PIL import Image

from tests.conftest import PHOTOS


@pytest.fixture()
def detector(engine):
    assert not engine.calibration.detector_upscale_small, "the shipped calibration was fitted on padded images"
    return engine.detectors[0]


def test_a_small_image_is_padded_at_its_own_size_on_its_letterbox_shape(detector):
    small = Image.new("RGB", (50, 57), (200, 30, 30))
    padded = detector._pad_small(small, (480, 640))
    assert padded.size == (640, 480)
    assert padded.getpixel((10, 10)) == (200, 30, 30)
    assert padded.getpixel((60, 60)) == (114, 114, 114)
    large = Image.new("RGB", (detector.image_size, 100))
    assert detector._pad_small(large, (480, 640)) is large


def test_each_image_runs_at_the_smallest_of_the_fixed_shapes_it_fits(detector, monkeypatch):
    from ultralytics.data.augment import LetterBox

    shapes: list[tuple[int, int]] = []
    original = LetterBox.__call__

    def recording(self, labels=None, image=None):
        letterboxed = original(self, labels, image)
        shapes.append(letterboxed.shape[:2])
        return letterboxed

    monkeypatch.setattr(LetterBox, "__call__", recording)  # ultralytics' own letterbox, watched
    photo = Image.open(PHOTOS / "bus.jpg").convert("RGB")  # 810x1080: portrait
    detector.predict([photo, photo.rotate(90, expand=True), photo.crop((0, 0, 810, 810)), photo.resize((300, 200))])
    assert shapes == [(640, 480), (480, 640), (640, 640), (480, 640)]


def test_boxes_of_a_padded_photo_are_in_its_own_pixels(detector):
    photo = Image.open(PHOTOS / "bus.jpg").convert("RGB")
    small = photo.resize((200, round(200 * photo.height / photo.width)))
    boxes = detector.predict([small])[0]
    names = [b.class_name for b in boxes]
    assert "bus" in names and names.count("person") >= 3
    for box in boxes:
        assert box.x >= 0 and box.y >= 0
        assert box.x + box.width <= small.width + 0.5 and box.y + box.height <= small.height + 0.5
    bus = next(b for b in boxes if b.class_name == "bus")
    assert bus.width > 0.9 * small.width  # the bus spans the photo, as at full size


def test_the_backend_is_ultralytics_own_as_its_predictor_set_it_up(detector):
    """What the device pipeline calls for an exported detector: ultralytics' loader and runtime,
    with our runtime settings already applied (OpenVINO in float32, inference/runtimes.py)."""
    import torch

    backend = detector.backend()
    assert backend is detector.model.predictor.model
    predictions = backend(torch.full((1, 3, detector.image_size, detector.image_size), 114 / 255))
    assert predictions.shape[:2] == (1, 4 + len(detector.names))
    compiled = getattr(backend.backend, "ov_compiled_model", None)
    if compiled is not None:
        assert "float32" in str(compiled.get_property("INFERENCE_PRECISION_HINT"))
