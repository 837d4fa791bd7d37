"""Image decoding rules, on generated images of every awkward kind a client may send."""

import numpy as np
import pytest
from PIL import Image

from service.errors import CorruptImage, ImageSizeInvalid, InvalidParameter, UnsupportedImage
from service.images import ImageRules, decode_base64, load_image
from tests.service import corpus

RULES = ImageRules(min_side=15, max_side=4096)


def test_sixteen_bit_grey_keeps_its_contrast():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    data = corpus.encode(Image.fromarray(ramp), "PNG")
    image = load_image(data, RULES)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.min() < 10 and pixels.max() > 240


def test_transparency_becomes_white_not_black():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert load_image(corpus.encode(clear, "PNG"), RULES).getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (32, 32), 0)
    palette.info["transparency"] = 0
    assert load_image(corpus.encode(palette, "PNG", transparency=0), RULES).getpixel((5, 5)) == (255, 255, 255)


def test_cmyk_jpeg_and_animated_webp_decode():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red
    red = load_image(corpus.encode(cmyk, "JPEG"), RULES).getpixel((20, 20))
    assert red[0] > 200 and red[1] < 60
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("blue", "green")]
    webp = corpus.encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    assert load_image(webp, RULES).getpixel((20, 20))[2] > 200


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image = load_image(corpus.encode(wide, "JPEG", exif=exif), RULES)
    assert image.size == (20, 60)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"GIF89a....", UnsupportedImage),
        (b"", UnsupportedImage),
        (corpus.truncated_jpeg(), CorruptImage),
        (corpus.png_bomb(), ImageSizeInvalid),
        (corpus.png_bomb(5000, 100), ImageSizeInvalid),
        (corpus.photo_like(15, 14), ImageSizeInvalid),
    ],
)
def test_refusals(data, error):
    with pytest.raises(error):
        load_image(data, RULES)


def test_base64_forms():
    raw = corpus.photo_like()
    b64 = corpus.b64(raw)
    assert decode_base64(b64, 10**7) == raw
    assert decode_base64(b64.rstrip("="), 10**7) == raw  # missing padding
    assert decode_base64("data:image/png;base64," + b64, 10**7) == raw
    with pytest.raises(InvalidParameter):
        decode_base64(b64[:-3] + "!!!", 10**7)
    with pytest.raises(ImageSizeInvalid):
        decode_base64(b64, 10)


def test_an_unidentifiable_image_is_corrupt_even_with_ultralytics_loaded():
    # ultralytics wraps Image.open on import; an unknown image then raises ImportError (pi_heif)
    import ultralytics  # noqa: F401
    from ultralytics.utils import patches  # noqa: F401

    with pytest.raises(CorruptImage):
        load_image(b"\xff\xd8\xff garbage" * 10, ImageRules(15, 4096))
