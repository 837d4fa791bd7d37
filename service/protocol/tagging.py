"""Wire models of the tagging API (contract sections 2-4)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import InvalidParameter, UnknownField
from service.protocol.common import invalid_parameter

REQUEST_FIELDS = ("image", "url", "language", "threshold", "limit")


class TaggingOptions(BaseModel):
    """How to answer: the part of a request that does not name the image (the CLI's flags)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    language: Literal["zh", "en"] = "zh"
    threshold: float = Field(60.0, ge=0, le=100, description="tags below this confidence are left out")
    limit: int = Field(50, ge=1, le=150, description="at most this many tags")

    @classmethod
    def parse(cls, payload: object) -> Self:
        """Validates a decoded JSON value, raising the catalogue's errors."""
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            raise _catalogue_error(error) from None


class TaggingRequest(TaggingOptions):
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
    def _one_source(self) -> TaggingRequest:
        if bool(self.image) == bool(self.url):
            raise ValueError("give exactly one of 'image' (base64) and 'url'")
        return self


def _catalogue_error(error: ValidationError) -> InvalidParameter | UnknownField:
    problems = error.errors(include_url=False)
    unknown = [str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        return UnknownField(
            f"unknown field {', '.join(map(repr, unknown))}; "
            f"the API accepts {', '.join(REQUEST_FIELDS)}"
        )
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


class TagItem(BaseModel):
    confidence: str = Field(description="0..100, two decimals, as a string")
    type: Literal["object", "scene", "concept"]
    tag: str = Field(description="the name in the requested language")
    i18n_tag: I18nText
    i18n_type: I18nText
    instances: list[TagInstance]


class TaggingResult(BaseModel):
    tags: list[TagItem]


class TaggingResponse(BaseModel):
    result: TaggingResult
