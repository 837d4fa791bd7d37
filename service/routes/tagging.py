"""The tagging endpoints (contract section 1): the SDK's path and the seed's two older ones."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.deps import Admitted, Caller, RequestBody, json_object
from service.protocol.common import ErrorBody
from service.protocol.tagging import TaggingRequest, TaggingResponse
from service.tagging import TaggingService

router = APIRouter(tags=["image tagging"])

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429, 500, 503)}
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TaggingRequest.model_json_schema()}},
    }
}


async def tagging_request(_credentials: Caller, body: RequestBody, _admission: Admitted) -> TaggingRequest:
    # FastAPI resolves these in order: credentials before the body is read, the body before the
    # rate limits count the request, and all three before the body is parsed.
    return TaggingRequest.parse(json_object(body))


def tagging_service(request: Request) -> TaggingService:
    return request.app.state.tagging


Body = Annotated[TaggingRequest, Depends(tagging_request)]
Tagger = Annotated[TaggingService, Depends(tagging_service)]


@router.post(
    "/v2/{project_id}/image/tagging",
    response_model=TaggingResponse,
    responses=_ERRORS,
    openapi_extra=_BODY_SCHEMA,
    summary="Tag an image (the official SDK's path)",
)
@router.post(
    "/v2.0/image/tagging",
    response_model=TaggingResponse,
    responses=_ERRORS,
    openapi_extra=_BODY_SCHEMA,
    summary="Tag an image (the project comes from the credentials)",
)
@router.post(
    "/v1.0/image/tagging",
    response_model=TaggingResponse,
    responses=_ERRORS,
    openapi_extra=_BODY_SCHEMA,
    summary="Tag an image (older path of the vendor's samples)",
)
async def tag(body: Body, admission: Admitted, tagger: Tagger) -> TaggingResponse:
    return await tagger.tag(body, admission)
