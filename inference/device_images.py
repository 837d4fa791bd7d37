"""Pixels on the models' device: JPEG decoded there (nvJPEG on CUDA, batched), every other format
and any JPEG the device decoder refuses decoded by PIL on the CPU, EXIF orientation applied, and the
detector's letterbox made there. The same code runs on a CPU device; that is how it is tested."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from inference.image_header import (
    ImageHeader,
    ImageRejected,
    ModelInput,
    UnreadableImage,
    check_side_limits,
    decode_with_pil,
    read_header,
    reduction,
)

# Ultralytics' own letterbox colour, as inference/detector.py pads.
LETTERBOX_GREY = 114
# JPEG colour modes nvJPEG and libjpeg turn into the same RGB as PIL does; CMYK and YCCK are
# converted differently by each decoder, so those go through PIL like the reference.
_DEVICE_JPEG_MODES = ("RGB", "L")


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call.
    # catch_warnings is not thread-safe before Python 3.14: at worst another thread's warning
    # filter is briefly lost, never a decoded pixel.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class Decoded(NamedTuple):
    pixels: torch.Tensor
    """(3, H, W) uint8 RGB, upright, on the device; smaller than the image when it was reduced."""
    width: int
    height: int
    """The image's own upright size, which boxes are given in."""


def decode_images(
    datas: list[bytes], device: torch.device, side_limits: tuple[int, int] | None = None
) -> list[torch.Tensor | ImageRejected]:
    """Per image: upright (3, H, W) uint8 RGB pixels on `device`, at full size, or why it was not
    decoded (see `decode_for_models`)."""
    return [d.pixels if isinstance(d, Decoded) else d for d in decode_for_models(datas, device, side_limits)]


def decode_for_models(
    datas: list[bytes],
    device: torch.device,
    side_limits: tuple[int, int] | None = None,
    needs: ModelInput | None = None,
) -> list[Decoded | ImageRejected]:
    """Per image: its upright pixels on `device`, or why it was not decoded.

    `side_limits` (shortest side at least, longest at most), checked on the header before any
    pixel is decoded. With `needs`, a large image is decoded no larger than the models use
    (`image_header.reduction`): a JPEG on a CPU by libjpeg at the reduced size, so its full-size
    pixels never exist; on a GPU whole by the device decoder, then reduced there. JPEGs for the
    device decoder are decoded together in one call; if that call fails (it returns nothing
    then), each is tried alone, and one the device decoder still refuses goes to PIL before it is
    given up."""
    headers: list[ImageHeader | ImageRejected] = []
    for data in datas:
        try:
            header = read_header(data)
            if side_limits is not None:
                check_side_limits(header, *side_limits)
            headers.append(header)
        except ImageRejected as error:
            headers.append(error)
    factors = [reduction(h, needs) if needs and isinstance(h, ImageHeader) else 1 for h in headers]
    decoded: list[torch.Tensor | ImageRejected | None] = [
        header if isinstance(header, ImageRejected) else None for header in headers
    ]
    on_device = [
        i
        for i, header in enumerate(headers)
        if isinstance(header, ImageHeader)
        and header.format == "JPEG"
        and header.mode in _DEVICE_JPEG_MODES
        and (device.type != "cpu" or factors[i] == 1)
    ]
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in on_device]
    if encoded:
        try:
            pixels: list[torch.Tensor | None] = list(_decode_jpegs(encoded, device))
        except RuntimeError:
            pixels = [_decode_one_jpeg(one, device) for one in encoded]
        for i, image in zip(on_device, pixels):
            if image is not None:
                decoded[i] = orient(reduce_pixels(image, factors[i]), headers[i].orientation)
        del encoded, pixels  # the whole-size pixels go before the CPU's decodes add theirs
    for i, image in enumerate(decoded):
        if image is None:
            decoded[i] = _decode_on_cpu(datas[i], device, factors[i])
    return [
        Decoded(image, *_upright_size(header)) if isinstance(image, torch.Tensor) else image
        for image, header in zip(decoded, headers)
    ]


def _upright_size(header: ImageHeader) -> tuple[int, int]:
    return (header.height, header.width) if header.orientation >= 5 else (header.width, header.height)


def reduce_pixels(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, H, W) uint8 pixels `factor` times smaller on each side, each the mean of its block as
    PIL's `reduce` makes it (edge blocks cut short, sides rounded up)."""
    if factor == 1:
        return pixels
    mean = torch.nn.functional.avg_pool2d(pixels.unsqueeze(0).float(), factor, ceil_mode=True)[0]
    return mean.round_().to(torch.uint8)


def _decode_one_jpeg(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpegs([encoded], device)[0]
    except RuntimeError:
        return None


def _decode_on_cpu(data: bytes, device: torch.device, factor: int = 1) -> torch.Tensor | ImageRejected:
    try:
        image = decode_with_pil(data, factor)
    except UnreadableImage as error:
        return error
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) pixels turned as EXIF orientation 1..8 asks, as PIL's `exif_transpose` does
    (torchvision applies the tag only when decoding on the CPU)."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return pixels.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return pixels.transpose(-2, -1).flip(-2)
    return pixels


@dataclass(frozen=True)
class Placement:
    """Where an image sits in its letterboxed square, to map boxes back to its own pixels."""

    width: int
    height: int
    left: int
    top: int
    scale_x: float
    scale_y: float

    def to_image(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """A letterbox box in the image's pixels, cut at the image's edges."""
        x1 = min(max((x1 - self.left) / self.scale_x, 0.0), self.width)
        x2 = min(max((x2 - self.left) / self.scale_x, 0.0), self.width)
        y1 = min(max((y1 - self.top) / self.scale_y, 0.0), self.height)
        y2 = min(max((y2 - self.top) / self.scale_y, 0.0), self.height)
        return x1, y1, x2, y2


def letterbox_shapes(size: int, rectangles: bool = True) -> tuple[tuple[int, int], ...]:
    """The letterbox shapes, (height, width), a detector of input `size` runs at: the square, and
    with `rectangles` a 4:3 landscape and portrait (640x480 for 640), the short side a multiple of
    the network's stride 32. A fixed set, so a GPU warms every shape once and never meets a new
    one; the rectangles spare a CPU the padding of a 4:3 or wider photo (the detector took 74.9 ms
    at 640x640 against 52.7 ms at 640x448 on the development machine)."""
    if not rectangles:
        return ((size, size),)
    short = size * 3 // 4 // 32 * 32
    return (size, size), (short, size), (size, short)


def letterbox_shape(
    height: int, width: int, size: int, rectangles: bool = True, enlarge_small: bool = False
) -> tuple[int, int]:
    """The smallest of `letterbox_shapes` an image of `height` x `width` fits at the scale
    `letterbox_into` gives it (its own size when smaller than `size`, unless `enlarge_small`,
    else `size` on its longest side). Exact integer comparisons: the scale in the chosen shape is
    then that same scale."""
    square, *rest = letterbox_shapes(size, rectangles)
    longest = max(height, width)
    for shape_height, shape_width in rest:
        scale_num, scale_den = (size, longest) if longest >= size or enlarge_small else (1, 1)
        if height * scale_num <= shape_height * scale_den and width * scale_num <= shape_width * scale_den:
            return shape_height, shape_width
    return square


def letterbox_into(canvas: torch.Tensor, pixels: torch.Tensor) -> Placement:
    """Places (3, h, w) uint8 `pixels` (or a stack of images of one size, (N, 3, h, w)) into
    `canvas` (3, H, W) (or (N, 3, H, W)), already grey, as inference/detector.py has ultralytics
    do it: an image smaller than the canvas's longest side sits top-left at its own size (the
    fitted calibration depends on small images never being enlarged); a larger one is scaled down
    keeping its aspect (bilinear, like ultralytics' cv2 INTER_LINEAR) and centred, with
    ultralytics' scale and rounding. The canvas is one of `letterbox_shapes`, chosen by
    `letterbox_shape`, so the image fits."""
    canvas_height, canvas_width = canvas.shape[-2:]
    height, width = pixels.shape[-2:]
    if max(height, width) < max(canvas_height, canvas_width):
        canvas[..., :height, :width] = pixels
        return Placement(width, height, 0, 0, 1.0, 1.0)
    ratio = min(canvas_height / height, canvas_width / width)
    new_height, new_width = max(round(height * ratio), 1), max(round(width * ratio), 1)
    if (new_height, new_width) != (height, width):
        pixels = F.resize(pixels, [new_height, new_width], interpolation=F.InterpolationMode.BILINEAR, antialias=False)
    top = round((canvas_height - new_height) / 2 - 0.1)
    left = round((canvas_width - new_width) / 2 - 0.1)
    canvas[..., top : top + new_height, left : left + new_width] = pixels
    return Placement(width, height, left, top, new_width / width, new_height / height)
