"""What the models give for one image, in the types a gateway reads.

Imports neither torch nor numpy nor PIL: a gateway that sends its images to `imagetag worker`s
(`IMAGETAG_INFERENCE=remote`) renders these without loading the models' libraries.

Per image, a `TagResult`: its tags, most confident first, or the error for that image alone:

    ModelError              the models failed on this image (the contract's 500 AIS.0505)
     └── UndecodableImage   its pixels could not be decoded: truncated or corrupt (400 AIS.0503)
          └── ImageTooLarge it would take more pixels than the decode budget holds (400 AIS.0504)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.vocabulary import Tag


@dataclass(frozen=True)
class Instance:
    """Where a tagged thing is, in the image's own pixels, and how sure the models are of it."""

    confidence: float
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Box(Instance):
    """One detection; its `confidence` is the detector's own score, before calibration."""

    class_name: str = field(kw_only=True)


@dataclass(frozen=True)
class ScoredTag:
    tag: Tag
    confidence: float
    """Calibrated, 0..1."""
    instances: tuple[Instance, ...] = ()


class ModelError(RuntimeError):
    """The models failed on one image; carried in that image's result slot."""


class UndecodableImage(ModelError):
    """The image's header passed its checks but its pixels could not be decoded (truncated or
    corrupt data); carried in that image's result slot."""


TagResult = list[ScoredTag] | ModelError


class ImageTooLarge(UndecodableImage):
    """Decoding the image would take more pixels than the whole pixel budget
    (`IMAGETAG_PIXEL_BUDGET_MP`), so it is never decoded; carried in that image's result slot."""

    @classmethod
    def over(cls, pixels: int, budget: int) -> ImageTooLarge:
        return cls(
            f"decoding this image takes {pixels / 1e6:.3g} megapixels, more than the service's "
            f"{budget / 1e6:.3g}-megapixel budget; send it smaller or as a JPEG"
        )
