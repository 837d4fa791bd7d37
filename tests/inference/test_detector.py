"""Small images reach the detector at their own size, padded, not enlarged (see the calibration fit)."""

import pytest
from PIL import Image

from tests.conftest import PHOTOS


@pytest.fixture()
def detector(engine):
    assert not engine.calibration.detector_upscale_small, "the shipped calibration was fitted on padded images"
    return engine.detectors[0]


def test_a_small_image_is_padded_at_its_own_size(detector):
    small = Image.new("RGB", (50, 57), (200, 30, 30))
    padded = detector._pad_small(small)
    assert padded.size == (detector.image_size, detector.image_size)
    assert padded.getpixel((10, 10)) == (200, 30, 30)
    assert padded.getpixel((60, 60)) == (114, 114, 114)
    large = Image.new("RGB", (detector.image_size, 100))
    assert detector._pad_small(large) is large


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
