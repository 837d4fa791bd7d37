"""The tagging use case: request in, response out, whatever the transport (HTTP or `imagetag tag`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from inference.client import InferenceClient, InferenceUnavailable
from inference.results import ImageTooLarge, ModelError, ScoredTag, UndecodableImage
from service.errors import CorruptImage, ImageSizeInvalid, ModelFailed, Overloaded
from service.images import ImageRules, check_image, decode_base64
from service.protocol.tagging import (
    BoundingBox,
    I18nText,
    TaggingOptions,
    TaggingRequest,
    TaggingResponse,
    TaggingResult,
    TagInstance,
    TagItem,
)
from service.settings import Settings
from service.url_fetch import FetchPolicy, fetch_image_bytes


@dataclass(frozen=True)
class TaggingLimits:
    max_base64_bytes: int
    image_rules: ImageRules
    fetch_policy: FetchPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> TaggingLimits:
        return cls(
            max_base64_bytes=settings.max_base64_bytes,
            image_rules=ImageRules(settings.min_image_side, settings.max_image_side),
            fetch_policy=FetchPolicy(
                timeout_s=settings.url_timeout_s,
                max_bytes=settings.url_max_bytes,
                max_redirects=settings.url_max_redirects,
                allowed_networks=settings.allowed_networks(),
            ),
        )


class Slots(Protocol):
    """The caller's concurrency budgets (service/gate.Admission): a download holds no inference slot."""

    def download(self) -> AbstractAsyncContextManager[object]: ...

    def inference(self) -> AbstractAsyncContextManager[object]: ...


class TaggingService:
    def __init__(
        self,
        inference: InferenceClient,
        limits: TaggingLimits,
        *,
        observe_decode: Callable[[float], None] | None = None,
    ) -> None:
        self.inference = inference
        self.limits = limits
        self.observe_decode = observe_decode

    async def tag(self, request: TaggingRequest, slots: Slots) -> TaggingResponse:
        if request.image:
            data = decode_base64(request.image, self.limits.max_base64_bytes)
        else:
            async with slots.download():
                data = await fetch_image_bytes(request.url, self.limits.fetch_policy)
        async with slots.inference():
            return await self.tag_bytes(data, request)

    async def tag_bytes(self, data: bytes, options: TaggingOptions) -> TaggingResponse:
        """Tags an encoded image (the bytes of a file or of a download), under the same rules: the
        header is checked here, the pixels are decoded on the inference side."""
        self._check(data)
        if not self.inference.ready:
            raise Overloaded("the models are still loading; retry shortly", headers={"Retry-After": "5"})
        try:
            (result,) = await self.inference.tag([data])
        except InferenceUnavailable as error:
            raise Overloaded(f"the service is overloaded ({error}); retry shortly", headers={"Retry-After": "1"}) from None
        if isinstance(result, ImageTooLarge):
            raise ImageSizeInvalid(str(result))
        if isinstance(result, UndecodableImage):
            raise CorruptImage(str(result))
        if isinstance(result, ModelError):
            raise ModelFailed(str(result))
        return render(result, language=options.language, threshold=options.threshold, limit=options.limit)

    def _check(self, data: bytes) -> None:
        # On the event loop: PIL reads a header lazily, in tens of microseconds (a thread hop
        # would cost more), and never decodes a pixel here.
        started = time.perf_counter()
        try:
            check_image(data, self.limits.image_rules)
        finally:
            if self.observe_decode is not None:
                self.observe_decode(time.perf_counter() - started)


def render(
    tags: list[ScoredTag], *, language: str, threshold: float, limit: int
) -> TaggingResponse:
    """Applies threshold, limit and language (tags arrive sorted, most confident first)."""
    kept = [t for t in tags if _percent(t.confidence) >= threshold][:limit]
    return TaggingResponse(result=TaggingResult(tags=[_item(t, language) for t in kept]))


def _item(scored: ScoredTag, language: str) -> TagItem:
    tag = scored.tag
    return TagItem(
        confidence=_confidence(scored.confidence),
        type=tag.type,
        tag=tag.zh if language == "zh" else tag.en,
        i18n_tag=I18nText(zh=tag.zh, en=tag.en),
        i18n_type=I18nText(zh=tag.category.zh, en=tag.category.en),
        instances=[
            TagInstance(
                confidence=_confidence(i.confidence),
                bounding_box=BoundingBox(
                    top_left_x=round(i.x, 2),
                    top_left_y=round(i.y, 2),
                    width=round(i.width, 2),
                    height=round(i.height, 2),
                ),
            )
            for i in scored.instances
        ],
    )


def _percent(confidence: float) -> float:
    # Compare what the client will read: a tag shown as "60.00" passes threshold 60.
    return round(confidence * 100, 2)


def _confidence(confidence: float) -> str:
    return f"{_percent(confidence):.2f}"
