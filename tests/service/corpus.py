"""Generated images for every image rule of the contract."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo_like(width: int = 64, height: int = 48, image_format: str = "PNG") -> bytes:
    gradient = Image.linear_gradient("L").resize((width, height))
    return encode(Image.merge("RGB", (gradient, gradient.rotate(90), gradient)), image_format)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring a huge image, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    whole = photo_like(200, 150, "JPEG")
    return whole[: len(whole) // 2]


def corrupt_png() -> bytes:
    whole = bytearray(photo_like(64, 64, "PNG"))
    # Scramble the compressed pixel data but keep the signature and header intact.
    start = whole.index(b"IDAT") + 4
    for offset in range(start, start + 40):
        whole[offset] ^= 0x5A
    return bytes(whole)


def gif() -> bytes:
    return encode(Image.new("RGB", (32, 32), "red"), "GIF")


def tiff() -> bytes:
    return encode(Image.new("RGB", (32, 32), "red"), "TIFF")
