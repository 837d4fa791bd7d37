"""Request dependencies shared by the routes: raw body, caller identity, admission."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Response

from service.auth.authenticator import IncomingRequest, Principal
from service.errors import BodyTooLarge, InvalidJson, InvalidParameter

# The SDK sends this literal (URL-decoded) when it was given no project id.
_UNSET_PROJECT = "{project_id}"
PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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


RawBody = Annotated[bytes, Depends(read_body)]


def json_object(body: bytes) -> dict:
    """The body as a JSON object; anything else is the contract's AIS.0014."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidJson("the request body must be a JSON object")
    return payload


def path_project(request: Request) -> str | None:
    project_id = request.path_params.get("project_id")
    if project_id is None:
        return None
    if project_id == _UNSET_PROJECT:
        raise InvalidParameter(
            "the path holds the placeholder {project_id}: give the SDK a project id "
            "(BasicCredentials(ak, sk, project_id)) or a region and IAM endpoint to discover it"
        )
    if not PROJECT_ID.fullmatch(project_id):
        raise InvalidParameter(f"project_id {project_id!r} is not a valid project id")
    return project_id


PathProject = Annotated[str | None, Depends(path_project)]


def incoming(request: Request, body: bytes) -> IncomingRequest:
    return IncomingRequest(
        method=request.method,
        raw_path=request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"),
        query=request.scope.get("query_string", b"").decode("latin-1"),
        headers={name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(request.scope["headers"])},
        body=body,
        client_host=request.client.host if request.client else None,
    )


async def caller(request: Request, body: RawBody, project_id: PathProject) -> Principal | None:
    """The authenticated caller; None when the service runs with IMAGETAG_AUTH_MODE=none."""
    authenticator = request.app.state.authenticator
    if authenticator is None:
        return None
    return await authenticator.identify(incoming(request, body), project_id)


Caller = Annotated[Principal | None, Depends(caller)]


async def admitted(
    request: Request, response: Response, principal: Caller, project_id: PathProject
) -> AsyncIterator[Principal | None]:
    """Rate limits and the per-project concurrency cap, held for the whole request."""
    project = principal.project if principal else None
    project_key = project.id if project else (project_id or "anonymous")
    access_key = principal.access_key if principal else None
    async with request.app.state.gate.admit(project_key, project, access_key) as rate_headers:
        response.headers.update(rate_headers)
        yield principal


Admitted = Annotated[Principal | None, Depends(admitted)]


async def domain_caller(request: Request, body: RawBody) -> Principal:
    authenticator = request.app.state.authenticator
    if authenticator is None:
        raise InvalidParameter("IAM is disabled (IMAGETAG_AUTH_MODE=none)")
    return await authenticator.identify_domain(incoming(request, body))


DomainCaller = Annotated[Principal, Depends(domain_caller)]
