"""Turning request bytes into a checked RGB image, refusing bad input before decoding pixels."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from inference import image_header
from service.errors import CorruptImage, ImageSizeInvalid, InvalidParameter, UnsupportedImage


@dataclass(frozen=True)
class ImageRules:
    min_side: int
    max_side: int


def decode_base64(text: str, max_bytes: int) -> bytes:
    if len(text) > max_bytes:
        raise ImageSizeInvalid(
            f"image: base64 text is {len(text)} bytes, more than the {max_bytes}-byte limit"
        )
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    # Line breaks are common (PHP's chunk_split, MIME encoders) and carry no data.
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter("image: not valid base64") from None


def sniff_format(data: bytes) -> str:
    """The format from the magic numbers, before PIL sees the bytes: the many other formats PIL
    can read (TIFF, GIF, PSD, ...) never reach a decoder."""
    try:
        return image_header.sniff_format(data)
    except image_header.UnreadableImage as error:
        raise UnsupportedImage(str(error)) from None


def load_image(data: bytes, rules: ImageRules) -> Image.Image:
    """Decoded, EXIF-upright RGB pixels; raises the catalogue's image errors."""
    image_format = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError:
        raise ImageSizeInvalid(
            f"the image declares far more pixels than {rules.max_side}x{rules.max_side}"
        ) from None
    # ImportError: once ultralytics is imported it wraps Image.open, and on an unidentifiable image
    # that wrapper tries to import a HEIF plugin (pi_heif) the service does not install.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError):
        raise CorruptImage(f"the {image_format} image cannot be decoded") from None
    _check_size(image.size, rules)  # from the header alone: no pixel has been decoded yet
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        raise CorruptImage(f"the {image_format} image is truncated or corrupt") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass  # a broken EXIF block is no reason to refuse otherwise good pixels
    return image_header.to_rgb(image)


def _check_size(size: tuple[int, int], rules: ImageRules) -> None:
    width, height = size
    if min(width, height) < rules.min_side or max(width, height) > rules.max_side:
        raise ImageSizeInvalid(
            f"the image is {width}x{height} px; the shortest side must be at least "
            f"{rules.min_side} px and the longest at most {rules.max_side} px"
        )
