"""The tagging use case: request in, response out, whatever the transport (HTTP or `imagetag tag`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from inference.client import InferenceClient, InferenceUnavailable
from inference.results import ImageTooLarge, ModelError, ScoredTag, TagResult, UndecodableImage
from inference.vocabulary import Vocabulary
from service.errors import CorruptImage, ImageSizeInvalid, ModelFailed, Overloaded, ServiceError, error_body
from service.images import ImageRules, check_image, decode_base64
from service.labels import LabelStructure
from service.protocol.common import ErrorBody
from service.protocol.tagging import (
    BatchTaggingResponse,
    BoundingBox,
    I18nText,
    ImageSource,
    TaggingOptions,
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


Source = ImageSource | bytes
"""One image of a request: base64 or a `url` as the contract has them, or the bytes of a file."""


class TaggingService:
    """Tags one image per call, or several (`tag_batch`): each image is read, checked and tagged
    under the same rules, and the models see all of a call's images at once."""

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
        self._labels: LabelStructure | None = None

    async def tag(self, source: Source, options: TaggingOptions, slots: Slots) -> TaggingResponse:
        if isinstance(source, ImageSource) and source.url:
            async with slots.download():
                data = await fetch_image_bytes(source.url, self.limits.fetch_policy)
        else:
            data = self._decoded(source)
        async with slots.inference():
            return await self.tag_bytes(data, options)

    async def tag_bytes(self, data: bytes, options: TaggingOptions) -> TaggingResponse:
        """Tags an encoded image (the bytes of a file or of a download), under the same rules: the
        header is checked here, the pixels are decoded on the inference side."""
        self._check(data)
        (result,) = await self._infer([data])
        return await self._response(result, options)

    async def tag_batch(self, sources: list[Source], options: TaggingOptions, slots: Slots) -> BatchTaggingResponse:
        """One answer per image, in order: its tags or its own error. A failure of the whole call
        (the models away or overloaded, a limit) raises instead.

        The call holds one download slot while it fetches its `url`s side by side, and one
        inference slot while the models tag all its images in one `InferenceClient.tag`: the
        slots bound a project's calls in progress, the rate limits count its images (one token
        each) and the inference queue (IMAGETAG_QUEUE_MAX) its images waiting; a slot per image
        would leave a batch of more than IMAGETAG_MAX_CONCURRENT_PER_PROJECT images no way in."""
        urls = {i: s.url for i, s in enumerate(sources) if isinstance(s, ImageSource) and s.url}
        outcomes = {i: _attempt(self._decoded, s) for i, s in enumerate(sources) if i not in urls}
        if urls:
            async with slots.download():
                outcomes |= zip(urls, await asyncio.gather(*map(self._fetch, urls.values())), strict=True)
        answers: dict[int, TaggingResponse | ErrorBody] = {}
        readable: dict[int, bytes] = {}
        for i, outcome in outcomes.items():
            outcome = outcome if isinstance(outcome, ServiceError) else _attempt(self._checked, outcome)
            if isinstance(outcome, ServiceError):
                answers[i] = ErrorBody(**error_body(outcome))
            else:
                readable[i] = outcome
        if readable:
            async with slots.inference():
                tagged = await self._infer(list(readable.values()))
            for i, result in zip(readable, tagged, strict=True):
                answers[i] = await self._settled(result, options)
        return BatchTaggingResponse(results=[answers[i] for i in range(len(sources))])

    def _decoded(self, source: Source) -> bytes:
        if isinstance(source, bytes):
            if len(source) > self.limits.max_base64_bytes:
                raise ImageSizeInvalid(
                    f"image: {len(source)} bytes, more than the {self.limits.max_base64_bytes}-byte limit"
                )
            return source
        return decode_base64(source.image or "", self.limits.max_base64_bytes)

    async def _fetch(self, url: str) -> bytes | ServiceError:
        try:
            return await fetch_image_bytes(url, self.limits.fetch_policy)
        except ServiceError as error:
            return error

    def _checked(self, data: bytes) -> bytes:
        self._check(data)
        return data

    async def _infer(self, images: list[bytes]) -> list[TagResult]:
        if not self.inference.ready:
            raise Overloaded("the models are still loading; retry shortly", headers={"Retry-After": "5"})
        try:
            return await self.inference.tag(images)
        except InferenceUnavailable as error:
            raise Overloaded(f"the service is overloaded ({error}); retry shortly", headers={"Retry-After": "1"}) from None

    async def _response(self, result: TagResult, options: TaggingOptions) -> TaggingResponse:
        if isinstance(result, ImageTooLarge):
            raise ImageSizeInvalid(str(result))
        if isinstance(result, UndecodableImage):
            raise CorruptImage(str(result))
        if isinstance(result, ModelError):
            raise ModelFailed(str(result))
        labels = await self._label_structure() if options.label_structure else None
        return render(result, language=options.language, threshold=options.threshold, limit=options.limit, labels=labels)

    async def _settled(self, result: TagResult, options: TaggingOptions) -> TaggingResponse | ErrorBody:
        try:
            return await self._response(result, options)
        except ServiceError as error:
            return ErrorBody(**error_body(error))

    async def _label_structure(self) -> LabelStructure:
        # Loaded on first use, off the event loop: most gateways are never asked.
        if self._labels is None:
            self._labels = LabelStructure.of(await asyncio.to_thread(Vocabulary.load))
        return self._labels

    def _check(self, data: bytes) -> None:
        # On the event loop: PIL reads a header lazily, in tens of microseconds (a thread hop
        # would cost more), and never decodes a pixel here.
        started = time.perf_counter()
        try:
            check_image(data, self.limits.image_rules)
        finally:
            if self.observe_decode is not None:
                self.observe_decode(time.perf_counter() - started)


def _attempt(step: Callable[[Any], bytes], source: Source) -> bytes | ServiceError:
    try:
        return step(source)
    except ServiceError as error:
        return error


def render(
    tags: list[ScoredTag], *, language: str, threshold: float, limit: int, labels: LabelStructure | None = None
) -> TaggingResponse:
    """Applies threshold, limit and language (tags arrive sorted, most confident first); with
    `labels`, adds each tag's parents, aliases and category ids."""
    kept = [t for t in tags if _percent(t.confidence) >= threshold][:limit]
    return TaggingResponse(result=TaggingResult(tags=[_item(t, language, labels) for t in kept]))


def _item(scored: ScoredTag, language: str, labels: LabelStructure | None) -> TagItem:
    tag = scored.tag
    structure = (
        {
            "parents": labels.parents(tag, language),
            "aliases": list(labels.aliases.get(tag.key, ())),
            "category_ids": [tag.category.key],
        }
        if labels is not None
        else {}
    )
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
        **structure,
    )


def _percent(confidence: float) -> float:
    # Compare what the client will read: a tag shown as "60.00" passes threshold 60.
    return round(confidence * 100, 2)


def _confidence(confidence: float) -> str:
    return f"{_percent(confidence):.2f}"
