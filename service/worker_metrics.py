"""Prometheus metrics of `imagetag worker`, on a registry of their own (no process defaults)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inference.batching import BatchStats
from inference.worker import OUTCOMES

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MODEL_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """A `WorkerObserver` that exports what the worker reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._batches = Counter(
            "imagetag_worker_batches", "Batches sent to the models", registry=self.registry
        )
        self._batch_size = Histogram(
            "imagetag_worker_batch_size", "Images per batch", buckets=_BATCH_SIZES, registry=self.registry
        )
        self._model_seconds = Histogram(
            "imagetag_worker_model_seconds",
            "Model time per batch, decoding included",
            buckets=_MODEL_SECONDS,
            registry=self.registry,
        )
        self.failed_batches = Counter(
            "imagetag_worker_failed_batches",
            "Model batches that failed and were retried image by image (each one is also logged)",
            registry=self.registry,
        )
        self._jobs = Counter(
            "imagetag_worker_jobs", "Jobs answered, by outcome", ["outcome"], registry=self.registry
        )
        for outcome in OUTCOMES:  # every series from the start, so rates see the first job
            self._jobs.labels(outcome)
        self._up = Gauge("imagetag_worker_up", "1 while the worker serves jobs", registry=self.registry)

    def batch(self, stats: BatchStats) -> None:
        self._batches.inc()
        self._batch_size.observe(stats.size)
        self._model_seconds.observe(stats.model_s)

    def jobs(self, outcome: str, count: int) -> None:
        self._jobs.labels(outcome).inc(count)

    def up(self, serving: bool) -> None:
        self._up.set(1 if serving else 0)

    def serve(self, host: str, port: int) -> None:
        """Serves /metrics on a daemon thread for the life of the process."""
        start_http_server(port, addr=host, registry=self.registry)
