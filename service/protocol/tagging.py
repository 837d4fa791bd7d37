"""Wire models of the tagging API (contract sections 2-4), and its extensions: several images per
call (`BatchTaggingRequest`), and each tag's place in the vocabulary on request (`label_structure`).
An extension adds nothing to what a contract client sends or receives."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import InvalidParameter, UnknownField
from service.protocol.common import ErrorBody, invalid_parameter

MAX_BATCH_IMAGES = 32


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @classmethod
    def parse(cls, payload: object, *, text: bool = False) -> Self:
        """Validates a decoded JSON value, raising the catalogue's errors; `text`: the values are
        strings to convert (query parameters, form fields)."""
        try:
            return cls.model_validate(payload, strict=not text)
        except ValidationError as error:
            raise _catalogue_error(error, tuple(cls.model_fields)) from None


class TaggingOptions(_Message):
    """How to answer: the part of a request that does not name the image (the CLI's flags)."""

    language: Literal["zh", "en"] = "zh"
    threshold: float = Field(60.0, ge=0, le=100, description="tags below this confidence are left out")
    limit: int = Field(50, ge=1, le=150, description="at most this many tags")
    label_structure: bool = Field(
        False,
        description=(
            "an extension, not in the vendor's API: true adds each tag's `parents`, `aliases` and "
            "`category_ids`; false or absent leaves the response exactly as the contract's"
        ),
    )


class ImageSource(_Message):
    """Exactly one of `image` (base64) and `url`; an empty string or null counts as absent."""

    image: str | None = Field(None, description="base64 of a JPG/PNG/BMP/WEBP image, at most 10 MB")
    url: str | None = Field(None, description="http(s) URL of such an image")

    @model_validator(mode="before")
    @classmethod
    def _absent_when_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if bool(self.image) == bool(self.url):
            raise ValueError("give exactly one of 'image' (base64) and 'url'")
        return self


class TaggingRequest(TaggingOptions, ImageSource):
    """One image, and how to answer."""


class BatchTaggingRequest(TaggingOptions):
    """Up to 32 images, answered in order under the same options."""

    images: list[ImageSource] = Field(min_length=1, max_length=MAX_BATCH_IMAGES)


def _catalogue_error(error: ValidationError, fields: tuple[str, ...]) -> InvalidParameter | UnknownField:
    problems = error.errors(include_url=False)
    unknown = [p["loc"] for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        # Only a batch nests: its images, each an ImageSource.
        accepted = ImageSource.model_fields if len(unknown[0]) > 1 else fields
        names = ", ".join(repr(".".join(map(str, loc))) for loc in unknown)
        return UnknownField(f"unknown field {names}; the API accepts {', '.join(accepted)}")
    return invalid_parameter(problems)


class BoundingBox(BaseModel):
    top_left_x: float = Field(description="pixels from the image's left edge")
    top_left_y: float = Field(description="pixels from the image's top edge")
    width: float
    height: float


class TagInstance(BaseModel):
    confidence: str = Field(description="0..100, two decimals, as a string")
    bounding_box: BoundingBox


class I18nText(BaseModel):
    zh: str
    en: str


class TagParent(BaseModel):
    name: str = Field(description="the parent's name in the requested language")
    i18n: I18nText


def _absent(value: object) -> bool:
    return value is None


class TagItem(BaseModel):
    confidence: str = Field(description="0..100, two decimals, as a string")
    type: Literal["object", "scene", "concept"]
    tag: str = Field(description="the name in the requested language")
    i18n_tag: I18nText
    i18n_type: I18nText
    instances: list[TagInstance]
    # label_structure only; absent from the JSON otherwise, so a contract response keeps its bytes.
    parents: list[TagParent] | None = Field(
        None, exclude_if=_absent, description="with label_structure: every more general tag, nearest first"
    )
    aliases: list[str] | None = Field(
        None, exclude_if=_absent, description="with label_structure: other names of the tag (the models' class names)"
    )
    category_ids: list[str] | None = Field(
        None, exclude_if=_absent, description="with label_structure: the ids of the tag's categories (`i18n_type`)"
    )


class TaggingResult(BaseModel):
    tags: list[TagItem]


class TaggingResponse(BaseModel):
    result: TaggingResult


class BatchTaggingResponse(BaseModel):
    results: list[TaggingResponse | ErrorBody] = Field(
        description="one per image, in request order: its tags, or its own error"
    )
