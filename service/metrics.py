"""Prometheus metrics of the gateway, served at `GET /metrics`.

One `Metrics` per app, each with its own `CollectorRegistry`, so several apps (and tests) can
live in one process. The model side reports plain numbers (`BatchStats`, decode seconds);
this module turns them into metrics. Scrapes of `/metrics` itself are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.batching import BatchStats
from inference.client import InferenceClient
from service.build import BuildInfo
from service.logs import IMAGES_STATE, PROJECT_STATE, log_request
from service.tracing import NoTracing, Tracing

METRICS_PATH = "/metrics"
# Where the error handlers leave the answered `error_code`, in the request's scope["state"].
ERROR_CODE_STATE = "error_code"
UNMATCHED_ROUTE = "unmatched"

# Stages inside one request: decode, queue wait and model time run from ~1 ms up.
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The gateway's metrics, in `registry`."""

    def __init__(self, latency_buckets_s: Sequence[float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagetag_requests_total",
            "HTTP requests answered, by route template, method, status and error_code",
            ["route", "method", "status", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "imagetag_request_duration_seconds", "Time to answer a request", ["route"],
            buckets=latency_buckets_s, registry=r,
        )
        self.in_flight = Gauge("imagetag_requests_in_flight", "Requests being answered", registry=r)
        self.decode = Histogram(
            "imagetag_decode_seconds", "Time to check one image's header (its pixels are decoded with the models)", buckets=STAGE_BUCKETS_S, registry=r
        )
        self.queue_wait = Histogram(
            "imagetag_queue_wait_seconds", "Time an image waited for its batch", buckets=STAGE_BUCKETS_S, registry=r
        )
        self.model = Histogram(
            "imagetag_model_seconds", "Model time of one batch", buckets=STAGE_BUCKETS_S, registry=r
        )
        self.batch_size = Histogram(
            "imagetag_batch_size", "Images per model batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.failed_batches = Counter(
            "imagetag_failed_batches",
            "Model batches that failed and were retried image by image (each one is also logged)",
            registry=r,
        )
        self.redis_errors = Counter(
            "imagetag_redis_errors",
            "Requests answered 503 because Redis (identities, limits, the job queue) did not answer",
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagetag_queue_depth", "Images still queued when the last batch was sent", registry=r
        )
        self._ready: Callable[[], bool] = lambda: False
        self._workers_alive: Callable[[], int] = lambda: int(self._ready())
        Gauge("imagetag_models_ready", "1 when the models are loaded", registry=r).set_function(
            lambda: float(self._ready())
        )
        Gauge("imagetag_workers_alive", "Inference workers answering", registry=r).set_function(
            lambda: float(self._workers_alive())
        )

    def describe_build(self, version: str, models: Callable[[], str]) -> None:
        """`imagetag_build_info`: the version, and the digests of the weights answering now."""
        self.registry.register(BuildInfo(version, models))

    def watch(self, inference: InferenceClient) -> None:
        """Reports `inference.ready` at each scrape (and, unless `count_workers`, one worker while ready)."""
        self._ready = lambda: inference.ready

    def count_workers(self, workers_alive: Callable[[], int]) -> None:
        """Remote inference: report the workers with a current heartbeat instead."""
        self._workers_alive = workers_alive

    def observe_batch(self, stats: BatchStats) -> None:
        """The `on_batch` hook of `BatchingInference`."""
        self.batch_size.observe(stats.size)
        self.model.observe(stats.model_s)
        for wait in stats.queue_wait_s:
            self.queue_wait.observe(wait)
        self.queue_depth.set(stats.queue_depth)

    def observe_decode(self, seconds: float) -> None:
        self.decode.observe(seconds)

    def observe_request(self, route: str, method: str, status: int, code: str, seconds: float) -> None:
        self.requests.labels(route, method, str(status), code).inc()
        self.request_duration.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts, times, logs (service.logs) and traces (service.tracing) every HTTP request but the
    scrapes, labelled by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing or NoTracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500  # if the app fails before it answers
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        with self.tracing.request_span(scope) as span:
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                self.metrics.in_flight.dec()
                seconds = time.perf_counter() - started
                route = getattr(scope.get("route"), "path_format", None) or UNMATCHED_ROUTE
                code = state.get(ERROR_CODE_STATE, "")
                self.metrics.observe_request(route, scope["method"], status, code, seconds)
                fields = {
                    "request_id": state.get("request_id", ""),
                    "project": state.get(PROJECT_STATE),
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "error_code": code,
                    "images": state.get(IMAGES_STATE, 0),
                    "latency_ms": round(seconds * 1000, 1),
                }
                self.tracing.finish_request(span, fields)
                log_request(fields)


router = APIRouter()


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
