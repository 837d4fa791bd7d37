"""Decoding, orientation and letterbox on a device, against PIL and ultralytics' own arithmetic; no models."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from inference.classifier import CROP_PADDING, INPUT_SIZE
from inference.device_images import (
    LETTERBOX_GREY,
    decode_for_models,
    decode_images,
    letterbox_into,
    orient,
    reduce_pixels,
)
from inference.image_header import (
    ImageHeader,
    ImageOutOfBounds,
    ModelInput,
    UnreadableImage,
    check_side_limits,
    decode_cost,
    decode_with_pil,
    read_header,
    reduction,
)
from inference.pipeline import bucket_for, bucket_sizes
from tests.conftest import PHOTOS, REPO

CPU = torch.device("cpu")


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def as_array(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).cpu().numpy()


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.open(PHOTOS / "cat_chelsea.jpg").convert("RGB")


def test_the_header_reader_imports_no_torch():
    """A gateway checks sizes with it without loading the models' libraries."""
    code = "import sys, inference.image_header; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_the_header_gives_size_format_and_orientation_without_decoding(cat):
    exif = Image.Exif()
    exif[0x0112] = 6
    header = read_header(encoded(cat, "JPEG", exif=exif))
    assert (header.format, header.width, header.height, header.orientation) == ("JPEG", 451, 300, 6)
    # A header alone, every pixel cut off: still enough for the size check.
    truncated = read_header((PHOTOS / "bus.jpg").read_bytes()[:2000])
    assert (truncated.width, truncated.height) == (768, 1024)
    with pytest.raises(ImageOutOfBounds, match="768x1024"):
        check_side_limits(truncated, min_side=15, max_side=720)
    check_side_limits(truncated, min_side=15, max_side=4096)
    with pytest.raises(UnreadableImage):
        read_header(b"GIF89a not accepted")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_pixels_as_pil_does(cat, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(cat, "JPEG", exif=exif, quality=95)
    (pixels,) = decode_images([data], CPU)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(as_array(pixels), expected)
    assert np.array_equal(as_array(orient(torch.from_numpy(np.array(cat)).permute(2, 0, 1), orientation)),
                          np.asarray(ImageOps.exif_transpose(_with_orientation(cat, orientation))))


def _with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    copy = image.copy()
    copy.getexif()[0x0112] = orientation
    return copy


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "WEBP"])
def test_other_formats_decode_on_the_cpu_like_pil(cat, image_format):
    options = {"lossless": True} if image_format == "WEBP" else {}
    data = encoded(cat, image_format, **options)
    (pixels,) = decode_images([data], CPU)
    assert np.array_equal(as_array(pixels), np.asarray(cat))


def test_a_cmyk_jpeg_goes_to_pil_like_the_reference(cat):
    data = encoded(cat.convert("CMYK"), "JPEG", quality=95)
    (pixels,) = decode_images([data], CPU)
    assert np.array_equal(as_array(pixels), np.asarray(decode_with_pil(data)))


def test_transparency_is_shown_over_white_and_grey_becomes_rgb():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    grey = Image.new("L", (40, 30), 77)
    transparent, grey_pixels = decode_images([encoded(rgba, "PNG"), encoded(grey, "JPEG")], CPU)
    assert as_array(transparent)[0, 0].tolist() == [255, 255, 255]
    assert as_array(grey_pixels)[0, 0].tolist() == [77, 77, 77]


def test_sixteen_bit_grey_keeps_its_contrast():
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    (pixels,) = decode_images([encoded(Image.fromarray(ramp), "PNG")], CPU)
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() < 10 and pixels.max() > 240


def test_an_animated_webp_is_its_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("blue", "green")]
    (pixels,) = decode_images([encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:])], CPU)
    assert pixels[2, 20, 20] > 200 and pixels[1, 20, 20] < 60


def test_a_corrupt_jpeg_is_an_error_for_itself_alone():
    good = (PHOTOS / "coffee.jpg").read_bytes()
    headers_only, half_scan = good[:600], good[: len(good) // 2]
    results = decode_images([good, headers_only, b"\xff\xd8\xff garbage", half_scan, good], CPU)
    assert all(isinstance(result, UnreadableImage) for result in results[1:4])
    expected = np.asarray(decode_with_pil(good))
    assert np.array_equal(as_array(results[0]), expected) and np.array_equal(as_array(results[4]), expected)


def test_small_images_sit_top_left_at_their_own_size():
    canvas = torch.full((3, 640, 640), LETTERBOX_GREY, dtype=torch.uint8)
    pixels = torch.full((3, 57, 50), 200, dtype=torch.uint8)
    placement = letterbox_into(canvas, pixels)
    assert (placement.left, placement.top, placement.scale_x, placement.scale_y) == (0, 0, 1.0, 1.0)
    assert canvas[:, 56, 49].tolist() == [200] * 3 and canvas[:, 57, 50].tolist() == [LETTERBOX_GREY] * 3
    assert placement.to_image(40, 50, 600, 600) == (40, 50, 50, 57)


def test_large_images_shrink_and_centre_with_ultralytics_rounding():
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.ops import scale_boxes

    image = np.random.default_rng(0).integers(0, 256, (1024, 683, 3), dtype=np.uint8)
    canvas = torch.full((3, 640, 640), LETTERBOX_GREY, dtype=torch.uint8)
    placement = letterbox_into(canvas, torch.from_numpy(image).permute(2, 0, 1))
    theirs = LetterBox((640, 640), auto=False)(image=image)
    ours = as_array(canvas).astype(int)
    assert ours.shape == theirs.shape
    # Same placement; pixels differ by rounding only (torch's float bilinear against cv2's fixed point).
    assert np.abs(ours - theirs).max() <= 2 and np.abs(ours - theirs).mean() < 0.5
    box = torch.tensor([[100.0, 50.0, 400.0, 600.0]])
    expected = scale_boxes((640, 640), box.clone(), (1024, 683)).tolist()[0]
    assert placement.to_image(*box.tolist()[0]) == pytest.approx(expected, abs=1e-3)


def test_buckets_are_powers_of_two_then_eighths_of_the_largest():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert bucket_sizes(128) == (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 24, 32, 40, 48)
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(6) == (1, 2, 4, 6)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert [bucket_for(n, bucket_sizes(64)) for n in (9, 43, 57)] == [16, 48, 64]


@pytest.mark.parametrize(
    ("size", "factor"),
    [
        ((4096, 4096), 4),  # 1024 a side: halving again would leave the letterbox short of 640
        ((1279, 1000), 1),
        ((1280, 1000), 2),
        ((4096, 583), 1),  # the classifier's crop needs a shortest side of 292
        ((4096, 584), 2),
        ((4096, 300), 1),
    ],
)
def test_an_image_is_reduced_only_as_far_as_the_models_still_use_every_pixel(size, factor):
    needs = ModelInput()
    assert needs.shortest == INPUT_SIZE + CROP_PADDING
    for width, height in (size, size[::-1]):
        assert reduction(ImageHeader("JPEG", width, height, "RGB"), needs) == factor
        jpeg = decode_cost(ImageHeader("JPEG", width, height, "RGB"), needs)
        assert jpeg == -(-width // factor) * -(-height // factor)
        assert decode_cost(ImageHeader("PNG", width, height, "RGB"), needs) == width * height
    assert reduction(ImageHeader("JPEG", 9000, 9000, "RGB"), ModelInput(longest=320)) == 8


def large(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.BICUBIC)


def test_a_large_jpeg_is_decoded_at_the_reduced_size_on_a_cpu(cat):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 2706x1800, upright 1800x2706
    data = encoded(large(cat, (2706, 1800)), "JPEG", quality=95, exif=exif)
    (decoded,) = decode_for_models([data], CPU, needs=ModelInput())
    assert (decoded.width, decoded.height) == (1800, 2706)
    assert decoded.pixels.shape == (3, 677, 450)  # a quarter: 676 >= 640 and 450 >= 292
    whole = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").reduce(4)
    difference = np.abs(as_array(decoded.pixels).astype(int) - np.asarray(whole).astype(int))
    assert difference.mean() < 2  # libjpeg's scaled decode, close to the whole image averaged
    (full,) = decode_images([data], CPU)
    assert full.shape == (3, 2706, 1800)


def test_other_formats_are_reduced_after_decoding_as_pil_does(cat):
    rgba = large(cat, (2600, 1730)).convert("RGBA")
    rgba.putalpha(200)
    data = encoded(rgba, "PNG")
    (decoded,) = decode_for_models([data], CPU, needs=ModelInput())
    assert (decoded.width, decoded.height) == (2600, 1730)
    expected = decode_with_pil(data).reduce(4)
    assert np.abs(as_array(decoded.pixels).astype(int) - np.asarray(expected).astype(int)).max() <= 2
    palette = encoded(large(cat, (1400, 700)).convert("P"), "PNG")
    (decoded,) = decode_for_models([palette], CPU, needs=ModelInput())
    assert decoded.pixels.shape == (3, 350, 700)


def test_pixels_decoded_whole_on_a_device_are_reduced_as_pil_reduces():
    stored = np.random.default_rng(0).integers(0, 256, (1283, 1001, 3), dtype=np.uint8)
    for factor in (1, 2, 4, 8):
        reduced = reduce_pixels(torch.from_numpy(stored).permute(2, 0, 1), factor)
        expected = np.asarray(Image.fromarray(stored).reduce(factor))
        assert reduced.dtype == torch.uint8
        assert np.abs(as_array(reduced).astype(int) - expected.astype(int)).max() <= 1
