"""The IAM endpoints existing clients call (contract section 6)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from service.deps import ClientHost, DomainCaller, ReceivedBody, json_object, receive_body
from service.errors import InvalidParameter
from service.iam import IamService
from service.protocol.common import ErrorBody
from service.protocol.iam import MAX_TOKEN_REQUEST_BYTES, ProjectList, TokenRequest, TokenResponse

router = APIRouter(tags=["IAM"])


async def iam_service(request: Request) -> IamService:
    if request.app.state.iam is None:
        raise InvalidParameter("IAM is disabled (IMAGETAG_AUTH_MODE=none)")
    return request.app.state.iam


Iam = Annotated[IamService, Depends(iam_service)]


async def token_request_body(request: Request) -> ReceivedBody:
    # Anyone may try a login: a body longer than any login is refused before it is read whole.
    return await receive_body(request, MAX_TOKEN_REQUEST_BYTES)


TokenRequestBody = Annotated[ReceivedBody, Depends(token_request_body)]


@router.post(
    "/v3/auth/tokens",
    status_code=201,
    response_model=TokenResponse,
    responses={
        201: {"headers": {"X-Subject-Token": {"description": "The token, for X-Auth-Token", "schema": {"type": "string"}}}},
        **{status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429)},
    },
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": TokenRequest.model_json_schema()}}}},
    summary="Password login: a project-scoped token in X-Subject-Token",
)
async def create_token(
    request: Request, body: TokenRequestBody, iam: Iam, client_host: ClientHost, nocatalog: str | None = None
) -> JSONResponse:
    token, response = await iam.login(
        TokenRequest.parse(json_object(body)),
        client_host=client_host,
        with_catalog=nocatalog is None,
        base_url=str(request.base_url).rstrip("/"),
    )
    return JSONResponse(
        response.model_dump(exclude_none=True), status_code=201, headers={"X-Subject-Token": token}
    )


@router.delete("/v3/auth/tokens", status_code=204, summary="Revoke the token in X-Subject-Token")
async def revoke_token(principal: DomainCaller, iam: Iam, subject: Annotated[str, Header(alias="X-Subject-Token")]) -> Response:
    await iam.revoke(principal, subject)
    return Response(status_code=204)


@router.get("/v3/projects", response_model=ProjectList, summary="Projects of the caller's account, by name")
async def list_projects(principal: DomainCaller, iam: Iam, name: Annotated[str | None, Query()] = None) -> ProjectList:
    return await iam.projects(principal, name)
