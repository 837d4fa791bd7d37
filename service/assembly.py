"""Builds the process's long-lived parts from Settings, once, in one place.

`build_components` gives everything a gateway runs on: the identity store and rate limiter
(embedded SQLite and in-process buckets, or Redis when `IMAGETAG_REDIS_URL` is set), the
inference client (models in this process, or `imagetag worker`s through Redis when
`IMAGETAG_INFERENCE=remote`), the metrics and the services the routes call. `create_app` only
wires them into FastAPI; the CLI only parses arguments into Settings.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from inference.client import FailureCounter, ImageTagger, InferenceClient
from inference.image_header import ModelInput
from service.auth.authenticator import Authenticator
from service.backends import Backends, build_backends
from service.build import version, weights_digests
from service.gate import Gate, Limits
from service.iam import IamService
from service.metrics import Metrics
from service.settings import ConfigurationError, Settings
from service.tagging import TaggingLimits, TaggingService
from service.tracing import Tracing, build_tracing

if TYPE_CHECKING:
    from inference.pipeline import DevicePipeline
    from inference.worker import JobTracer, Worker, WorkerObserver

log = logging.getLogger(__name__)

EngineFactory = Callable[[], ImageTagger]

# A CPU gains nothing from larger batches and a request waits for its whole batch. A GPU is
# launch-bound below a few dozen images: on an H200 the device pipeline gave 871 images/s at
# batch 32 and 994 at 128 (load-tests/gpu_pipeline.py), and at 8, today's CPU default, the
# worker answered 305 images/s (load-tests/gpu_benchmark.py). 64 also fits IMAGETAG_QUEUE_MAX's
# default, so the embedded batcher can fill it.
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 64


def model_batch_size(settings: Settings) -> int:
    """`IMAGETAG_BATCH_MAX_SIZE`, else the default for the device this process's models run on
    (the embedded service's, a worker's: a remote gateway has none and never asks)."""
    if settings.batch_max_size is not None:
        return settings.batch_max_size
    from inference.devices import resolve_device

    return GPU_BATCH_SIZE if resolve_device(settings.device).type == "cuda" else CPU_BATCH_SIZE


@dataclass
class Components:
    """Everything one gateway process runs on; `create_app` takes it as it is."""

    settings: Settings
    backends: Backends
    inference: InferenceClient
    metrics: Metrics
    gate: Gate
    tagging: TaggingService
    authenticator: Authenticator | None  # None with IMAGETAG_AUTH_MODE=none
    iam: IamService | None
    tracing: Tracing
    models: Callable[[], str]
    """The digests of the weights that answered the request in hand (service.build)."""

    async def close(self) -> None:
        await self.inference.close()
        await self.backends.close()
        self.tracing.close()


def build_components(
    settings: Settings,
    *,
    inference: InferenceClient | None = None,
    build_engine: EngineFactory | None = None,
) -> Components:
    """The gateway's parts. `inference` replaces the configured client (tests, benchmarks);
    `build_engine` replaces the models behind the in-process batcher."""
    if settings.auth_mode == "none":
        log.warning(
            "IMAGETAG_AUTH_MODE=none: every request is accepted without credentials; "
            "use this only on a trusted network"
        )
    backends = build_backends(settings)
    metrics = Metrics(settings.latency_buckets_s)
    tracing = build_tracing(settings, "imagetag-gateway")
    if inference is None:
        inference = build_inference(settings, backends.redis, metrics, build_engine, tracing.traceparent)
    metrics.watch(inference)
    if settings.inference == "remote":  # the workers' weights, as their replies name them
        models = lambda: getattr(inference, "answered_by", "")  # noqa: E731
        metrics.describe_build(version(), lambda: getattr(inference, "last_models", ""))
    else:
        models = functools.cache(functools.partial(weights_digests, settings))
        metrics.describe_build(version(), models)
    gate = Gate(
        backends.limiter,
        Limits(
            rate_per_s=settings.rate_limit_per_s,
            burst=settings.rate_limit_burst,
            max_concurrent_per_project=settings.max_concurrent_per_project,
            login_per_minute=settings.login_attempts_per_minute,
            login_failures_per_hour=settings.login_failures_per_hour,
            max_concurrent_downloads_per_project=settings.max_concurrent_downloads_per_project,
        ),
    )
    iam_enabled = settings.auth_mode == "iam"
    return Components(
        settings=settings,
        backends=backends,
        inference=inference,
        metrics=metrics,
        gate=gate,
        tagging=build_tagging(settings, inference, metrics),
        authenticator=Authenticator(
            backends.store,
            clock_skew=timedelta(seconds=settings.clock_skew_s),
            trusted_proxies=settings.proxy_networks(),
        )
        if iam_enabled
        else None,
        iam=IamService(backends.store, gate, timedelta(seconds=settings.token_ttl_s)) if iam_enabled else None,
        tracing=tracing,
        models=models,
    )


def build_tagging(settings: Settings, inference: InferenceClient, metrics: Metrics | None = None) -> TaggingService:
    return TaggingService(
        inference,
        TaggingLimits.from_settings(settings),
        observe_decode=metrics.observe_decode if metrics is not None else None,
    )


def build_inference(
    settings: Settings,
    redis: Redis | None,
    metrics: Metrics | None = None,
    build_engine: EngineFactory | None = None,
    trace_context: Callable[[], str] | None = None,
) -> InferenceClient:
    """The configured inference client: models in this process, or workers through Redis (each
    job carrying `trace_context()`, the request's traceparent)."""
    if settings.inference == "remote":
        if redis is None:
            raise ConfigurationError("IMAGETAG_INFERENCE=remote needs IMAGETAG_REDIS_URL")
        from inference.remote import RemoteInference

        remote = RemoteInference(
            redis,
            queue_max=settings.queue_max,
            default_timeout_s=settings.request_timeout_s,
            trace_context=trace_context,
        )
        if metrics is not None:
            metrics.count_workers(lambda: remote.workers_alive)
        return remote
    from inference.batching import BatchingConfig, BatchingInference

    config = BatchingConfig(
        max_batch_size=model_batch_size(settings),
        max_wait_s=settings.batch_max_wait_s,
        max_queue=settings.queue_max,
        default_timeout_s=settings.request_timeout_s,
        replicas=settings.model_replicas,
        pixel_budget=settings.pixel_budget,
        model_input=ModelInput(longest=settings.detector_image_size),
    )
    return BatchingInference(
        build_engine or engine_factory(settings, metrics.failed_batches if metrics is not None else None),
        config,
        on_batch=metrics.observe_batch if metrics is not None else None,
    )


def engine_factory(settings: Settings, failed_batches: FailureCounter | None = None) -> EngineFactory:
    """Builds one replica of the models per call: on an inference thread, never at import or on
    the event loop. The embedded service and `imagetag worker` serve through the same
    `DevicePipeline`, on CPU and CUDA alike, every batch shape warmed before the first request.
    Later replicas share the first one's weights where its runtimes allow (`DevicePipeline.replica`)."""
    first: list[DevicePipeline] = []

    def build() -> ImageTagger:
        from inference.pipeline import DevicePipeline

        if first and (replica := first[0].replica()) is not None:
            return replica
        pipeline = DevicePipeline.build(
            settings.engine_config(),
            max_batch=model_batch_size(settings),
            failed_batches=failed_batches,
            side_limits=(settings.min_image_side, settings.max_image_side),
        )
        if not first:
            first.append(pipeline)
        return pipeline

    return build


def build_worker(
    settings: Settings,
    redis: Redis,
    observer: WorkerObserver | None = None,
    failed_batches: FailureCounter | None = None,
    tracer: JobTracer | None = None,
) -> Worker:
    from inference.worker import Worker, WorkerConfig

    config = WorkerConfig(
        max_batch_size=model_batch_size(settings),
        max_wait_s=settings.batch_max_wait_s,
        heartbeat_s=settings.worker_heartbeat_s,
        visibility_timeout_s=settings.job_visibility_timeout_s,
        models=weights_digests(settings),
        replicas=settings.model_replicas,
        pixel_budget=settings.pixel_budget,
        model_input=ModelInput(longest=settings.detector_image_size),
    )
    return Worker(redis, engine_factory(settings, failed_batches), config, observer, tracer)
