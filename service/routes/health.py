"""Liveness and readiness, for load balancers and Kubernetes probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.protocol.health import Status

router = APIRouter(tags=["health"])


def _example(status: str, **response: Any) -> dict[str, Any]:
    return {"content": {"application/json": {"example": {"status": status}}}, **response}


@router.get(
    "/healthz",
    response_model=Status,
    responses={200: _example("ok")},
    summary="The process is up (models may still be loading)",
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Status,
    responses={200: _example("ready"), 503: _example("loading", model=Status, description="Models still loading")},
    summary="The models are loaded and requests can be served",
)
async def readyz(request: Request) -> JSONResponse:
    if request.app.state.inference.ready:
        return JSONResponse({"status": "ready"})
    if request.app.state.load_failure is not None:  # the process is on its way out: no Retry-After
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
