"""The OpenAPI document as the service really behaves, for clients, /docs and /redoc.

FastAPI's own document describes the framework's defaults: a 422 no client ever gets, no path
parameter where the route reads it in a dependency, no credentials, no headers, no examples.
`document()` starts from it and puts the truth in, read from the routes themselves (which
dependencies an operation passes through) and from the error catalogue:

- every `{name}` in a path is a declared path parameter;
- an operation behind `deps.caller` or `deps.domain_caller` needs an `X-Auth-Token` or an
  SDK-HMAC-SHA256 signature (none when the service runs with IMAGETAG_AUTH_MODE=none);
- every error status lists the catalogue's codes it carries, each with an example; 422 becomes
  the 400 AIS.0501 that the service answers instead;
- response headers: `X-Request-Id` everywhere, `X-RateLimit-*` behind `deps.admitted`,
  `Retry-After` on 429 and 503;
- request and response bodies get the examples of `service.protocol.examples`.
"""

from __future__ import annotations

import copy
import re
from http import HTTPStatus
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from service import deps
from service.errors import (
    CATALOGUE,
    CorruptImage,
    DownloadFailed,
    ImageSizeInvalid,
    InvalidJson,
    MissingCredentials,
    ModelFailed,
    ServiceError,
    UnknownField,
    UnsupportedImage,
    UrlNotAllowed,
)
from service.protocol.examples import ERROR_MESSAGES, EXAMPLES

TOKEN_SCHEME = "X-Auth-Token"
SIGNATURE_SCHEME = "SDK-HMAC-SHA256"

DESCRIPTION = """\
A drop-in image tagging API: the vendor's SDK and its sample code work against it unchanged.

**Credentials.** Send an IAM token in `X-Auth-Token` (from `POST /v3/auth/tokens`), or sign the
request with an access key (`Authorization: SDK-HMAC-SHA256 ...` and `X-Sdk-Date`), as the SDK
does. A service run with `IMAGETAG_AUTH_MODE=none` takes every request without credentials.

**Beyond the vendor's API** (its SDK never uses these): `.../image/tagging/batch` tags up to 32
images per call; the tagging paths also take an image's own bytes (`image/jpeg`, `image/png`,
`image/bmp`, `image/webp`, the options as query parameters) and `multipart/form-data`; and
`label_structure: true` adds each tag's parents, aliases and category ids.

**Errors.** Every error is `{"error_code": ..., "error_msg": ...}` with the status and code of
the error catalogue; an unknown path or method is 404 `APIG.0101`. Every response carries an
`X-Request-Id` to quote when reporting a problem.
"""

SECURITY_SCHEMES = {
    TOKEN_SCHEME: {
        "type": "apiKey",
        "in": "header",
        "name": "X-Auth-Token",
        "description": "An IAM token: the `X-Subject-Token` header of `POST /v3/auth/tokens`.",
    },
    SIGNATURE_SCHEME: {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": (
            "An access key's signature, as the vendor's SDK computes it: "
            "`SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<h1;h2>, Signature=<hex>`, an HMAC-SHA256 "
            "with the secret key over the canonical request (method, path, query, the signed headers, "
            "Host and X-Sdk-Date among them, and the body's SHA-256), dated by `X-Sdk-Date` "
            "(`YYYYMMDDTHHMMSSZ`, within IMAGETAG_CLOCK_SKEW_S of the service's clock)."
        ),
    },
}

PATH_PARAMETERS = {
    "project_id": {
        "description": "The project's id (`GET /v3/projects`); credentials must be for this project.",
        "schema": {"type": "string", "pattern": f"^{deps.PROJECT_ID.pattern}$"},
        "example": "0123456789abcdef0123456789abcdef",
    },
}

PROJECT_HEADER = {
    "name": "X-Project-Id",
    "in": "header",
    "required": False,
    "description": "The project to bill when the path names none; unset: the token's project.",
    "schema": {"type": "string", "pattern": f"^{deps.PROJECT_ID.pattern}$"},
}

# Errors that only the tagging operations raise: they judge an image or a strict request body.
_TAGGING_ERRORS: frozenset[type[ServiceError]] = frozenset(
    {UnknownField, UnsupportedImage, CorruptImage, ImageSizeInvalid, UrlNotAllowed, DownloadFailed, ModelFailed}
)

_STRING = {"schema": {"type": "string"}}
_INTEGER = {"schema": {"type": "integer"}}
REQUEST_ID_HEADER = {
    "X-Request-Id": {
        "description": "This request's id, for the logs: the client's own X-Request-Id when it is 1 to 64 "
        "characters of A-Za-z0-9._-, else a fresh one",
        **_STRING,
    },
    "X-Imagetag-Version": {"description": "The version of the service that answered", **_STRING},
    "X-Imagetag-Models": {
        "description": "The sha256 digests of the model weights that answer "
        "(detector=sha256:HEX,...,classifier=sha256:HEX); with remote workers, those of the worker "
        "that served the request, and absent where none did",
        **_STRING,
    },
}
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests allowed in a burst", **_INTEGER},
    "X-RateLimit-Remaining": {"description": "Requests left in the current burst", **_INTEGER},
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying", **_INTEGER}}


def install(app: FastAPI) -> None:
    """Makes `app.openapi()` (and so /openapi.json) answer with `document`, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, auth=app.state.authenticator is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, *, auth: bool) -> dict[str, Any]:
    # A copy: FastAPI shares the routes' `openapi_extra` objects between operations and apps.
    spec = copy.deepcopy(get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=DESCRIPTION, routes=app.routes
    ))
    components = spec.setdefault("components", {})
    components["securitySchemes"] = SECURITY_SCHEMES
    for route, operation in _operations(app, spec):
        _declare_path_parameters(route.path_format, operation)
        _describe(route, operation, auth=auth)
        _add_examples(operation)
    schemas = components.get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def _operations(app: FastAPI, spec: dict[str, Any]) -> Iterator[tuple[RouteContext, dict[str, Any]]]:
    # Route contexts, not app.routes: an included router stays one entry there.
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for method in sorted(route.methods):
                yield route, spec["paths"][route.path_format][method.lower()]


def _depends_on(dependant: Dependant, *calls: Callable[..., Any]) -> bool:
    return any(sub.call in calls or _depends_on(sub, *calls) for sub in dependant.dependencies)


def _declare_path_parameters(path: str, operation: dict[str, Any]) -> None:
    parameters = operation.setdefault("parameters", [])
    declared = {p["name"] for p in parameters if p["in"] == "path"}
    for name in re.findall(r"{(\w+)}", path):
        if name not in declared:
            described = PATH_PARAMETERS.get(name, {"schema": {"type": "string"}})
            parameters.insert(0, {"name": name, "in": "path", "required": True, **described})


def _describe(route: RouteContext, operation: dict[str, Any], *, auth: bool) -> None:
    responses: dict[str, Any] = operation["responses"]
    # FastAPI's validation errors reach the client as the catalogue's 400 AIS.0501.
    if responses.pop("422", None) is not None:
        responses.setdefault("400", {})
    scoped = _depends_on(route.dependant, deps.caller)
    secured = scoped or _depends_on(route.dependant, deps.domain_caller)
    admitted = _depends_on(route.dependant, deps.admitted)
    if secured and auth:
        operation["security"] = [{TOKEN_SCHEME: []}, {SIGNATURE_SCHEME: []}]
        responses.setdefault("401", {})
    elif secured:
        operation["security"] = []
        for status in ("401", "403"):
            responses.pop(status, None)
    if scoped and "{project_id}" not in route.path_format:
        operation.setdefault("parameters", []).append(PROJECT_HEADER)
    if "requestBody" in operation:  # every body is read under a size cap
        responses.setdefault("413", {})
    if "429" in responses:
        responses.setdefault("503", {})  # what guards the rate (Redis) can be away
    # The server's own bounds on any request (service/server.py): a head too large, or too slow.
    responses.setdefault("408", {})
    responses.setdefault("431", {})
    responses.setdefault("500", {})
    errors = _errors_of(tagging=admitted, body="requestBody" in operation, secured=secured)
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers.update(REQUEST_ID_HEADER)
        if status in ("429", "503"):
            headers.update(RETRY_AFTER_HEADER)
        if admitted and status in ("200", "429"):
            headers.update(RATE_LIMIT_HEADERS)
        if int(status) in errors and _schema_name(_json(response).get("schema", {})) in (None, "ErrorBody"):
            _error_content(response, int(status), errors[int(status)])


def _errors_of(*, tagging: bool, body: bool, secured: bool) -> dict[int, list[tuple[str, type[ServiceError]]]]:
    """The catalogue's (code, error) pairs an operation can answer, by status."""
    by_status: dict[int, list[tuple[str, type[ServiceError]]]] = {}
    for error, (status, code) in CATALOGUE.items():
        irrelevant = (
            (error in _TAGGING_ERRORS and not tagging)
            or (error is InvalidJson and not body)
            or (error is MissingCredentials and not secured)
        )
        if not irrelevant:
            by_status.setdefault(status, []).append((code, error))
    return by_status


def _error_content(response: dict[str, Any], status: int, errors: list[tuple[str, type[ServiceError]]]) -> None:
    codes = ", ".join(f"`{code}` ({error.__name__})" for code, error in errors)
    response["description"] = f"{response.get('description') or HTTPStatus(status).phrase}: {codes}"
    response["content"] = {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"},
            "examples": {
                f"{code} {error.__name__}": {"value": {"error_code": code, "error_msg": ERROR_MESSAGES[error]}}
                for code, error in errors
            },
        }
    }


def _add_examples(operation: dict[str, Any]) -> None:
    bodies = operation.get("requestBody", {}).get("content", {}).values()
    for content in [*bodies, *map(_json, operation["responses"].values())]:
        if not {"example", "examples"} & content.keys() and (name := _schema_name(content.get("schema", {}))) in EXAMPLES:
            content["examples"] = EXAMPLES[name]


def _json(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON media type of a request body or response; empty when there is none."""
    return body.get("content", {}).get("application/json", {})


def _schema_name(schema: dict[str, Any]) -> str | None:
    if ref := schema.get("$ref"):
        return ref.rsplit("/", 1)[-1]
    return schema.get("title")
