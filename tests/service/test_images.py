"""The gateway's image rules, on generated images of every awkward kind a client may send: all
decided from the header, before any pixel is decoded (the pixels are decoded with the models,
tests/inference/test_device_images.py)."""

import pytest
from PIL import Image

from service.errors import CorruptImage, ImageSizeInvalid, InvalidParameter, UnsupportedImage
from service.images import ImageRules, check_image, decode_base64
from tests.conftest import PHOTOS
from tests.service import corpus

RULES = ImageRules(min_side=15, max_side=4096)


@pytest.mark.parametrize(
    "data",
    [
        corpus.photo_like(),
        corpus.photo_like(15, 4096),
        corpus.encode(Image.new("CMYK", (40, 40)), "JPEG"),
        corpus.encode(Image.new("I;16", (40, 40)), "PNG"),
        corpus.photo_like(64, 48, "WEBP"),
        corpus.photo_like(64, 48, "BMP"),
    ],
    ids=["png", "longest side at the limit", "cmyk jpeg", "16-bit png", "webp", "bmp"],
)
def test_accepted_images_pass(data):
    check_image(data, RULES)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"GIF89a....", UnsupportedImage),
        (b"", UnsupportedImage),
        (corpus.gif(), UnsupportedImage),
        (b"\xff\xd8\xff garbage" * 10, CorruptImage),
        (b"\x89PNG\r\n\x1a\nnot really", CorruptImage),
        (corpus.png_bomb(), ImageSizeInvalid),
        (corpus.png_bomb(5000, 100), ImageSizeInvalid),
        (corpus.photo_like(15, 14), ImageSizeInvalid),
        (corpus.photo_like(4097, 20), ImageSizeInvalid),
    ],
)
def test_refusals(data, error):
    with pytest.raises(error):
        check_image(data, RULES)


def test_sizes_are_checked_on_the_header_alone():
    """Cut after its header, a photo is still measured (and its missing pixels are the models'
    side's to find: tests/service/routes/test_tagging.py)."""
    header_only = (PHOTOS / "bus.jpg").read_bytes()[:3000]
    check_image(header_only, RULES)
    with pytest.raises(ImageSizeInvalid, match="768x1024"):
        check_image(header_only, ImageRules(min_side=15, max_side=1000))
    check_image(corpus.truncated_jpeg(), RULES)


def test_base64_forms():
    raw = corpus.photo_like()
    b64 = corpus.b64(raw)
    assert decode_base64(b64, 10**7) == raw
    assert decode_base64(b64.rstrip("="), 10**7) == raw  # missing padding
    assert decode_base64("data:image/png;base64," + b64, 10**7) == raw
    mime_lines = "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    assert decode_base64(mime_lines, 10**7) == raw
    assert decode_base64(mime_lines.rstrip("="), 10**7) == raw
    for broken in (b64[:-3] + "!!!", b64[:-3] + "é==", b64.replace("+", "-")):
        with pytest.raises(InvalidParameter):
            decode_base64(broken, 10**7)
    with pytest.raises(ImageSizeInvalid):
        decode_base64(b64, 10)


def test_an_unidentifiable_image_is_corrupt_even_with_ultralytics_loaded():
    # ultralytics wraps Image.open on import; an unknown image then raises ImportError (pi_heif)
    import ultralytics  # noqa: F401
    from ultralytics.utils import patches  # noqa: F401

    with pytest.raises(CorruptImage):
        check_image(b"\xff\xd8\xff garbage" * 10, RULES)
