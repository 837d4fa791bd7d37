"""The EfficientNet-Lite2 classifier: its input pipeline against known values, its BatchNorm folding,
and the real model on real photos. Its other runtimes are compared with it in `test_runtimes.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.classifier import INPUT_SIZE, Classifier, fold_batchnorm, load_model, preprocess
from tests.conftest import PHOTOS


def rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def expected(pixels: np.ndarray) -> np.ndarray:
    """TensorFlow's EfficientNet-Lite scaling, channels first."""
    return ((pixels.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def test_pixels_are_scaled_with_mean_127_and_std_128():
    # 260 / (260 + 32) of the shorter side of 292 is 260: cropped, not resized, so every value is known.
    pixels = np.random.default_rng(7).integers(0, 256, (292, 292, 3), dtype=np.uint8)
    tensor = preprocess(Image.fromarray(pixels))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, INPUT_SIZE, INPUT_SIZE)
    np.testing.assert_allclose(tensor.numpy(), expected(pixels[16:276, 16:276]), atol=1e-6)
    assert float(tensor.min()) >= -127 / 128 and float(tensor.max()) <= 1.0


def test_the_centre_is_kept_with_the_margin_and_scaled_to_the_input_size():
    # A landscape photo-sized image: a 260/292 centre square of the short side is kept, then scaled.
    pixels = np.zeros((584, 1168, 3), dtype=np.uint8)
    pixels[:, :] = (255, 0, 0)  # what must be cropped away
    pixels[32:552, 324:844] = (0, 200, 100)  # the kept square: round(260 / 292 * 584) = 520 pixels
    tensor = preprocess(Image.fromarray(pixels))
    assert tensor.shape == (3, INPUT_SIZE, INPUT_SIZE)
    np.testing.assert_allclose(tensor.numpy(), expected(np.full((260, 260, 3), (0, 200, 100))), atol=1e-6)


def test_folded_batchnorm_gives_the_same_probabilities_and_leaves_the_model_as_it_was():
    model = load_model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    batch = torch.stack([preprocess(rgb(PHOTOS / "cat_chelsea.jpg")), preprocess(rgb(PHOTOS / "bus.jpg"))])
    with torch.inference_mode():
        reference, got = model(batch).softmax(-1), folded(batch).softmax(-1)
    assert torch.equal(reference.argmax(-1), got.argmax(-1))
    assert float((reference - got).abs().max()) < 1e-4


def test_classifier_is_confident_on_a_cat(engine):
    probabilities = engine.classifier.predict([rgb(PHOTOS / "cat_chelsea.jpg")])[0]
    top = int(np.argmax(probabilities))
    assert "cat" in engine.vocabulary.ancestors[engine.vocabulary.imagenet[top]]
    assert probabilities[top] > 0.4
    cat_classes = [i for i, key in enumerate(engine.vocabulary.imagenet) if "cat" in engine.vocabulary.ancestors[key]]
    assert probabilities[cat_classes].sum() > 0.7


def test_a_batch_gives_one_distribution_per_image_in_order(engine):
    cat, bus = rgb(PHOTOS / "cat_chelsea.jpg"), rgb(PHOTOS / "bus.jpg")
    together = engine.classifier.predict([cat, bus, cat])
    assert together.shape == (3, 1000)
    np.testing.assert_allclose(together.sum(axis=1), 1.0, atol=1e-5)
    assert together[0].argmax() == together[2].argmax() != together[1].argmax()
    np.testing.assert_allclose(together[1], engine.classifier.predict([bus])[0], atol=1e-4)


@pytest.mark.parametrize("runtime, device, message", [
    ("tensorrt", "cpu", "unknown classifier runtime"),
    ("onnx", "cuda", "runs on CPU only"),  # only a name here: nothing runs on it
])
def test_runtimes_it_cannot_use_are_refused_by_name(runtime, device, message):
    with pytest.raises(ValueError, match=message):
        Classifier(None, torch.device(device), runtime)
