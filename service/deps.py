"""Request dependencies shared by the routes: the body, caller identity, admission.

Credentials are checked from the request head before the body is read (a signature reads it
itself), the body is read before the rate limits count the request, and only then is it parsed:
a caller without valid credentials never has its body buffered or parsed. Concurrency slots are
taken later, where the work is (`service.tagging`).

Every dependency here and in the routes is `async def`, even one that awaits nothing: FastAPI runs
a plain `def` dependency on its thread pool, a thread hop per request for a lookup.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from starlette.requests import ClientDisconnect

from service.auth.authenticator import IncomingRequest, Principal
from service.errors import BodyTooLarge, IncompleteRequest, InvalidJson, InvalidParameter
from service.gate import Admission
from service.logs import IMAGES_STATE, PROJECT_STATE
from service.networks import client_address

# The SDK sends this literal (URL-decoded) when it was given no project id.
_UNSET_PROJECT = "{project_id}"
PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Parsing costs time by the values in a body, not by its bytes: a request has a few commas, and a
# body with more than this many is refused before it is parsed. Commas alone bound the values:
# JSON puts one between any two, and nesting without them ends at the parser's depth limit.
_MAX_JSON_COMMAS = 10_000
# The API's numbers are a threshold and a limit: a longer one is out of range whatever it says,
# and converting thousands of digits is quadratic.
_MAX_NUMBER_CHARS = 100


@dataclass(frozen=True)
class ReceivedBody:
    """A body with what was learnt of it as it streamed in, so that nothing reads it whole twice."""

    data: bytes
    json_commas: int
    """With the parser's depth limit, a bound on the values it can hold as JSON."""
    sha256: str | None = None
    """Hex, when a signature asked for it."""

    @classmethod
    def of(cls, data: bytes) -> ReceivedBody:
        """A body received whole."""
        return cls(data, data.count(b","))


async def receive_body(request: Request, limit: int, *, hashed: bool = False) -> ReceivedBody:
    """The raw body, refused past `limit` bytes without reading it all into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    digest = hashlib.sha256() if hashed else None
    chunks, size, commas = [], 0, 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body is larger than {limit} bytes")
            commas += chunk.count(b",")
            if digest is not None:
                digest.update(chunk)
            chunks.append(chunk)
    except ClientDisconnect:
        # Most often the server's own IMAGETAG_BODY_TIMEOUT_S: no one is left to answer.
        raise IncompleteRequest("the connection closed before the whole body arrived") from None
    return ReceivedBody(b"".join(chunks), commas, digest.hexdigest() if digest else None)


async def request_body(request: Request, *, hashed: bool = False) -> ReceivedBody:
    """The body under IMAGETAG_MAX_BODY_BYTES, read once whether a signature (which wants it
    `hashed`) or a route asks first."""
    received = getattr(request.state, "received_body", None)
    if received is None:
        received = await receive_body(request, request.app.state.settings.max_body_bytes, hashed=hashed)
        request.state.received_body = received
    return received


async def _request_body(request: Request) -> ReceivedBody:
    return await request_body(request)


RequestBody = Annotated[ReceivedBody, Depends(_request_body)]


def json_object(body: ReceivedBody) -> dict:
    """The body as a JSON object; anything else is the contract's AIS.0014, and a number longer
    than any field's is AIS.0501. The parse takes milliseconds per megabyte whatever the body
    holds (json keeps the GIL throughout: a thread would not free the event loop)."""
    if body.json_commas > _MAX_JSON_COMMAS:
        raise InvalidJson(f"the request body holds {body.json_commas} commas; a request has a few")
    try:
        payload = json.loads(
            body.data, parse_int=lambda text: int(_short(text)), parse_float=lambda text: float(_short(text))
        )
    except RecursionError:
        raise InvalidJson("the request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError among them
        raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidJson("the request body must be a JSON object")
    return payload


def _short(number: str) -> str:
    if len(number) > _MAX_NUMBER_CHARS:
        raise InvalidParameter(
            f"a number in the body is {len(number)} characters long; none of the API's is over {_MAX_NUMBER_CHARS}"
        )
    return number


async def path_project(request: Request) -> str | None:
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


async def client_host(request: Request) -> str | None:
    """The client's address: the peer's, or behind IMAGETAG_TRUSTED_PROXIES the one they forward."""
    peer = request.client.host if request.client else None
    proxies = request.app.state.settings.proxy_networks()
    return client_address(peer, request.headers.getlist("x-forwarded-for"), proxies)


ClientHost = Annotated[str | None, Depends(client_host)]


def incoming(request: Request) -> IncomingRequest:
    async def body_sha256() -> str:
        received = await request_body(request, hashed=True)
        if received.sha256 is None:  # read before credentials: a route's mistake
            raise RuntimeError("the body was read before its signature was checked")
        return received.sha256

    return IncomingRequest(
        method=request.method,
        raw_path=request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"),
        query=request.scope.get("query_string", b"").decode("latin-1"),
        headers={name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(request.scope["headers"])},
        body_sha256=body_sha256,
        client_host=request.client.host if request.client else None,
    )


async def caller(request: Request, project_id: PathProject) -> Principal | None:
    """The authenticated caller; None when the service runs with IMAGETAG_AUTH_MODE=none."""
    authenticator = request.app.state.authenticator
    if authenticator is None:
        return None
    return await authenticator.identify(incoming(request), project_id)


Caller = Annotated[Principal | None, Depends(caller)]


async def admitted(request: Request, response: Response, principal: Caller, project_id: PathProject) -> Admission:
    """Past the rate limits; the concurrency slots are taken where the work is (service/tagging)."""
    project = principal.project if principal else None
    project_key = project.id if project else (project_id or "anonymous")
    access_key = principal.access_key if principal else None
    admission = await request.app.state.gate.admit(project_key, project, access_key)
    # For the access log (service.logs): whose request, and how many images it was admitted for.
    setattr(request.state, PROJECT_STATE, project_key)
    setattr(request.state, IMAGES_STATE, 1)
    response.headers.update(admission.headers)
    return admission


Admitted = Annotated[Admission, Depends(admitted)]


async def domain_caller(request: Request) -> Principal:
    authenticator = request.app.state.authenticator
    if authenticator is None:
        raise InvalidParameter("IAM is disabled (IMAGETAG_AUTH_MODE=none)")
    return await authenticator.identify_domain(incoming(request))


DomainCaller = Annotated[Principal, Depends(domain_caller)]
