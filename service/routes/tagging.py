"""The tagging endpoints (contract section 1): the SDK's path and the seed's two older ones."""

from __future__ import annotations

import json
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from service.errors import BodyTooLarge, InvalidJson, InvalidParameter
from service.protocol.common import ErrorBody
from service.protocol.tagging import TaggingRequest, TaggingResponse
from service.tagging import TaggingService

router = APIRouter(tags=["image tagging"])

# The SDK sends this literal (URL-decoded) when it was given no project id.
_UNSET_PROJECT = "{project_id}"
_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429, 500, 503)}
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TaggingRequest.model_json_schema()}},
    }
}


async def read_body(request: Request) -> bytes:
    """The raw body, refused past the size cap without reading it all into memory."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def tagging_request(body: Annotated[bytes, Depends(read_body)]) -> TaggingRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidJson("the request body must be a JSON object")
    return TaggingRequest.parse(payload)


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
async def tag_in_project(project_id: Annotated[str, Path()], body: Body, tagger: Tagger) -> TaggingResponse:
    if project_id == _UNSET_PROJECT:
        raise InvalidParameter(
            "the path holds the placeholder {project_id}: give the SDK a project id "
            "(BasicCredentials(ak, sk, project_id)) or a region and IAM endpoint to discover it"
        )
    if not _PROJECT_ID.fullmatch(project_id):
        raise InvalidParameter(f"project_id {project_id!r} is not a valid project id")
    return await tagger.tag(body)


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
async def tag(body: Body, tagger: Tagger) -> TaggingResponse:
    return await tagger.tag(body)
