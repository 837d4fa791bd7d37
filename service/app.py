"""The FastAPI application: routes, error handlers and middleware around built components."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.tasks import log_task_failure
from service.assembly import Components
from service.build import MODELS_HEADER, VERSION_HEADER, version
from service.errors import InternalError, Overloaded, RouteNotFound, ServiceError, error_body, status_and_code
from service.metrics import ERROR_CODE_STATE, RequestMetricsMiddleware
from service.metrics import router as metrics_router
from service.protocol.common import invalid_parameter
from service.openapi import install as install_openapi
from service.routes import demo, docs, health, iam, tagging

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# An incoming id is kept (a proxy's or the client's, to follow one request through every log)
# only when it cannot smuggle anything into a header or a log line.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(
    components: Components, *, on_load_failure: Callable[[BaseException], None] | None = None
) -> FastAPI:
    """The HTTP face of `components` (built by `service.assembly.build_components`).
    `on_load_failure` hears when the models fail to load; /readyz says "failed" from then on."""
    inference = components.inference

    def loaded(task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        app.state.load_failure = task.exception()
        if on_load_failure is not None:
            on_load_failure(task.exception())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /healthz answers at once and /readyz says when we are ready.
        loading = asyncio.create_task(inference.start())
        loading.add_done_callback(log_task_failure("loading the models"))
        loading.add_done_callback(loaded)
        # The weights' digests for the X-Imagetag-Models header: hashed once, off the event loop,
        # rather than by the first request.
        digests = asyncio.create_task(asyncio.to_thread(components.models))
        digests.add_done_callback(log_task_failure("hashing the weights"))
        try:
            yield
        finally:
            loading.cancel()
            digests.cancel()
            await components.close()

    app = FastAPI(
        title="imagetag",
        summary="Self-hosted, drop-in image tagging API",
        version=version(),
        lifespan=lifespan,
        docs_url=None,  # served by routes.docs, without a CDN
        redoc_url=None,
    )
    install_openapi(app)
    app.state.settings = components.settings
    app.state.inference = inference
    app.state.load_failure = None
    app.state.metrics = components.metrics
    app.state.gate = components.gate
    app.state.tagging = components.tagging
    app.state.authenticator = components.authenticator
    app.state.iam = components.iam
    app.include_router(tagging.router)
    app.include_router(iam.router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(docs.router)
    app.include_router(demo.router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_middleware(RequestIdMiddleware, models=components.models)
    # Outermost: sees RequestId's 500s.
    app.add_middleware(RequestMetricsMiddleware, metrics=components.metrics, tracing=components.tracing)
    return app


def error_response(error: ServiceError, scope: Scope | None = None) -> JSONResponse:
    """The error envelope; with `scope`, the code is also noted there for the request metrics."""
    status, code = status_and_code(error)
    if scope is not None:
        scope.setdefault("state", {})[ERROR_CODE_STATE] = code
    return JSONResponse(error_body(error), status_code=status, headers=error.headers)


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    return error_response(error, request.scope)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code in (404, 405):
        return error_response(RouteNotFound(f"no API at {request.method} {request.url.path}"), request.scope)
    log.warning("unexpected HTTP error %s: %s", error.status_code, error.detail)
    return error_response(InternalError("unexpected error"), request.scope)


async def _redis_error(request: Request, error: RedisError) -> JSONResponse:
    log.warning("Redis unavailable: %r", error)
    request.app.state.metrics.redis_errors.inc()
    return error_response(
        Overloaded("the shared store (Redis) is unreachable; retry shortly", headers={"Retry-After": "1"}),
        request.scope,
    )


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(invalid_parameter(error.errors()), request.scope)


class RequestIdMiddleware:
    """Tags every response with an `X-Request-Id` (the client's when well-formed), the version and
    the digests of the weights that answered (`models`, read as the response starts), and turns
    any escaped exception into the contract's AIS.0506 envelope (Starlette's own fallback would
    answer in plain text)."""

    def __init__(self, app: ASGIApp, models: Callable[[], str]) -> None:
        self.app = app
        self.models = models
        self.version = version().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
                           (VERSION_HEADER.lower().encode(), self.version)]
                if models := self.models():
                    headers.append((MODELS_HEADER.lower().encode(), models.encode()))
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            response = error_response(InternalError(f"internal error; request id {request_id}"), scope)
            await response(scope, receive, send_with_id)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_REQUEST_ID.fullmatch(text) else None
    return None
