"""What an image's header says (format, size, EXIF orientation), read without decoding a pixel,
and the PIL decode that every format falls back to. Imports no torch: a gateway can check sizes
with it before handing the bytes to the models."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Magic numbers of the accepted formats, so that the many other formats PIL can read (TIFF, GIF,
# PSD, ...) never reach a decoder.
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
}
_EXIF_ORIENTATION = 0x0112
# Once ultralytics is imported, its patched `Image.open` answers an unidentifiable image by
# importing the HEIF plugin, which raises ImportError where pi-heif is not installed.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, ImportError)


class ImageRejected(ValueError):
    """An image that is not decoded; the message says why."""


class UnreadableImage(ImageRejected):
    """The bytes are not an accepted image, or its pixels cannot be decoded."""


class ImageOutOfBounds(ImageRejected):
    """The header declares a size outside the accepted range; no pixel was decoded."""


@dataclass(frozen=True)
class ImageHeader:
    format: str
    """JPEG, PNG, BMP or WEBP."""
    width: int
    height: int
    """As stored, before the EXIF orientation turns the image upright."""
    mode: str
    """PIL's name for the stored pixels: RGB, L, CMYK, RGBA, P, ..."""
    orientation: int = 1
    """EXIF orientation, 1 (upright) to 8."""


def sniff_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES.items():
        if data.startswith(signature):
            return name
    raise UnreadableImage("the image is not a JPG, PNG, BMP or WEBP file")


def read_header(data: bytes) -> ImageHeader:
    """The header's facts; PIL opens lazily, so no pixel is decoded here."""
    image_format = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            try:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
            except (OSError, SyntaxError, ValueError, TypeError, KeyError):
                orientation = 1  # a broken EXIF block is no reason to refuse good pixels
            width, height = image.size
            return ImageHeader(image_format, width, height, image.mode, orientation if 1 <= orientation <= 8 else 1)
    except Image.DecompressionBombError:
        raise ImageOutOfBounds("the image declares far more pixels than PIL's safety limit") from None
    except _UNREADABLE:
        raise UnreadableImage(f"the {image_format} header cannot be read") from None


def check_side_limits(header: ImageHeader, min_side: int, max_side: int) -> None:
    """Raises `ImageOutOfBounds` for a shortest side under `min_side` or a longest over `max_side`."""
    if min(header.width, header.height) < min_side or max(header.width, header.height) > max_side:
        raise ImageOutOfBounds(
            f"the image is {header.width}x{header.height} px; the shortest side must be at least "
            f"{min_side} px and the longest at most {max_side} px"
        )


@dataclass(frozen=True)
class ModelInput:
    """The least picture the models use in full: the detector letterboxes the longest side to
    `longest`, the classifier crops 260/292 of the shortest and resizes it to 260."""

    longest: int = 640
    shortest: int = 292


def reduction(header: ImageHeader, needs: ModelInput) -> int:
    """1, 2, 4 or 8: the largest factor an image can be decoded smaller by (JPEG's DCT scaling
    offers these) and still give the models every pixel they use."""
    longest, shortest = max(header.width, header.height), min(header.width, header.height)
    factor = 1
    while factor < 8 and longest // (factor * 2) >= needs.longest and shortest // (factor * 2) >= needs.shortest:
        factor *= 2
    return factor


def reduced_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """The size libjpeg's scaled decode and PIL's `reduce` give: each side divided, rounded up."""
    return -(-width // factor), -(-height // factor)


def decode_cost(header: ImageHeader, needs: ModelInput) -> int:
    """Pixels the decoder holds at once for this image: a JPEG is decoded reduced, any other
    format whole before it is reduced."""
    if header.format == "JPEG":
        width, height = reduced_size(header.width, header.height, reduction(header, needs))
        return width * height
    return header.width * header.height


def pixel_cost(data: bytes, needs: ModelInput) -> int:
    """`decode_cost` of encoded bytes; 0 when the header cannot be read (the decoder then refuses
    the image without decoding a pixel)."""
    try:
        return decode_cost(read_header(data), needs)
    except ImageRejected:
        return 0


# Modes `Image.reduce` averages correctly; palette indices, 16-bit and 1-bit images are turned
# into RGB first.
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


def decode_with_pil(data: bytes, factor: int = 1) -> Image.Image:
    """Upright RGB pixels of any accepted format, `factor` times smaller on each side (a JPEG is
    decoded at that size, libjpeg's DCT scaling; any other format is box-averaged after
    decoding); raises `UnreadableImage`."""
    image_format = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
        stored = image.size
        if factor > 1 and image_format == "JPEG":
            image.draft(None, (stored[0] // factor, stored[1] // factor))
        image.load()
    except _UNREADABLE:
        raise UnreadableImage(f"the {image_format} image is truncated or corrupt") from None
    if factor > 1 and image.size == stored:
        if image.mode not in _REDUCIBLE:
            image = to_rgb(image)
        image = image.reduce(factor)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows it: 16-bit greys scaled down, transparency over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
