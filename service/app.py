"""Builds the FastAPI application and its state, once, from Settings and an inference client."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.client import InferenceClient
from service.assembly import Backends
from service.auth.authenticator import Authenticator
from service.errors import (
    InternalError,
    InvalidParameter,
    Overloaded,
    RouteNotFound,
    ServiceError,
    status_and_code,
)
from service.gate import Gate, Limits
from service.iam import IamService
from service.metrics import ERROR_CODE_STATE, Metrics, RequestMetricsMiddleware
from service.metrics import router as metrics_router
from service.routes import health, iam, tagging
from service.settings import Settings
from service.tagging import TaggingLimits, TaggingService

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


def create_app(
    settings: Settings, inference: InferenceClient, backends: Backends, metrics: Metrics | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /healthz answers at once and /readyz says when we are ready.
        loading = asyncio.create_task(inference.start())
        loading.add_done_callback(_log_load_failure)
        try:
            yield
        finally:
            loading.cancel()
            await inference.close()
            await backends.close()

    app = FastAPI(
        title="imagetag",
        summary="Self-hosted, drop-in image tagging API",
        version="0.1.0",
        lifespan=lifespan,
    )
    gate = Gate(
        backends.limiter,
        Limits(
            rate_per_s=settings.rate_limit_per_s,
            burst=settings.rate_limit_burst,
            max_concurrent_per_project=settings.max_concurrent_per_project,
            login_per_minute=settings.login_attempts_per_minute,
        ),
    )
    iam_enabled = settings.auth_mode == "iam"
    metrics = metrics if metrics is not None else Metrics.from_settings(settings)
    metrics.watch(inference)
    app.state.settings = settings
    app.state.inference = inference
    app.state.metrics = metrics
    app.state.gate = gate
    app.state.tagging = TaggingService(
        inference, TaggingLimits.from_settings(settings), observe_decode=metrics.observe_decode
    )
    app.state.authenticator = (
        Authenticator(
            backends.store,
            clock_skew=timedelta(seconds=settings.clock_skew_s),
            trusted_proxies=settings.proxy_networks(),
        )
        if iam_enabled
        else None
    )
    app.state.iam = IamService(backends.store, gate, timedelta(seconds=settings.token_ttl_s)) if iam_enabled else None
    app.include_router(tagging.router)
    app.include_router(iam.router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: sees RequestId's 500s
    return app


def _log_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("loading the models failed: %s", task.exception())


def error_response(error: ServiceError, scope: Scope | None = None) -> JSONResponse:
    """The error envelope; with `scope`, the code is also noted there for the request metrics."""
    status, code = status_and_code(error)
    if scope is not None:
        scope.setdefault("state", {})[ERROR_CODE_STATE] = code
    return JSONResponse(
        {"error_code": code, "error_msg": error.message}, status_code=status, headers=error.headers
    )


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    return error_response(error, request.scope)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code in (404, 405):
        return error_response(RouteNotFound(f"no API at {request.method} {request.url.path}"), request.scope)
    log.warning("unexpected HTTP error %s: %s", error.status_code, error.detail)
    return error_response(InternalError("unexpected error"), request.scope)


async def _redis_error(request: Request, error: RedisError) -> JSONResponse:
    log.warning("Redis unavailable: %r", error)
    return error_response(
        Overloaded("the shared store (Redis) is unreachable; retry shortly", headers={"Retry-After": "1"}),
        request.scope,
    )


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(InvalidParameter(f"invalid request: {error.errors()[0]['msg']}"), request.scope)


class RequestIdMiddleware:
    """Tags every response with an `X-Request-Id`, and turns any escaped exception into the
    contract's AIS.0506 envelope (Starlette's own fallback would answer in plain text)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            response = error_response(InternalError(f"internal error; request id {request_id}"), scope)
            await response(scope, receive, send_with_id)
