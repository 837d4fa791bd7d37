"""The tagging endpoints (contract section 1): the SDK's path and the seed's two older ones, each
with its batch extension beside it (`.../image/tagging/batch`, up to 32 images per call)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from service.deps import Admitted, Caller, RequestBody
from service.logs import IMAGES_STATE
from service.protocol.common import ErrorBody
from service.protocol.tagging import BatchTaggingRequest, BatchTaggingResponse, TaggingRequest, TaggingResponse
from service.tagging import TaggingService
from service.uploads import Images, one_image, several_images, upload_bodies, upload_parameters

router = APIRouter(tags=["image tagging"])

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429, 500, 503)}


def _body(model: type[TaggingRequest | BatchTaggingRequest], *, raw: bool) -> dict[str, Any]:
    content = {"application/json": {"schema": model.model_json_schema()}, **upload_bodies(several=not raw, raw=raw)}
    return {"requestBody": {"required": True, "content": content}} | ({"parameters": upload_parameters()} if raw else {})


async def tagging_request(request: Request, _credentials: Caller, body: RequestBody, _admission: Admitted) -> Images:
    # FastAPI resolves these in order: credentials before the body is read, the body before the
    # rate limits count the request, and all three before the body is parsed.
    return one_image(body, request.headers.get("content-type", ""), request.query_params)


async def batch_request(
    request: Request, response: Response, _credentials: Caller, body: RequestBody, admission: Admitted
) -> Images:
    # As above; the call's first token is taken before the parse, one more per image after it.
    images = several_images(body, request.headers.get("content-type", ""))
    response.headers.update(await admission.count_images(len(images.sources)))
    setattr(request.state, IMAGES_STATE, len(images.sources))  # for the access log
    return images


async def tagging_service(request: Request) -> TaggingService:
    return request.app.state.tagging


Body = Annotated[Images, Depends(tagging_request)]
BatchBody = Annotated[Images, Depends(batch_request)]
Tagger = Annotated[TaggingService, Depends(tagging_service)]

_ONE = {"response_model": TaggingResponse, "responses": _ERRORS, "openapi_extra": _body(TaggingRequest, raw=True)}
_BATCH = {
    "response_model": BatchTaggingResponse,
    "responses": _ERRORS,
    "openapi_extra": _body(BatchTaggingRequest, raw=False),
    "description": (
        "An extension, not in the vendor's API: up to 32 images under one set of options, one "
        "result per image in request order (its tags, or its own error). A call takes one "
        "rate-limit token per image."
    ),
}


@router.post("/v2/{project_id}/image/tagging", summary="Tag an image (the official SDK's path)", **_ONE)
@router.post("/v2.0/image/tagging", summary="Tag an image (the project comes from the credentials)", **_ONE)
@router.post("/v1.0/image/tagging", summary="Tag an image (older path of the vendor's samples)", **_ONE)
async def tag(body: Body, admission: Admitted, tagger: Tagger) -> TaggingResponse:
    (source,) = body.sources
    return await tagger.tag(source, body.options, admission)


@router.post("/v2/{project_id}/image/tagging/batch", summary="Tag several images", **_BATCH)
@router.post("/v2.0/image/tagging/batch", summary="Tag several images (the project from the credentials)", **_BATCH)
@router.post("/v1.0/image/tagging/batch", summary="Tag several images (older path)", **_BATCH)
async def tag_batch(body: BatchBody, admission: Admitted, tagger: Tagger) -> BatchTaggingResponse:
    return await tagger.tag_batch(body.sources, body.options, admission)
