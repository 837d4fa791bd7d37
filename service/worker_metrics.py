"""What `imagetag worker` serves on IMAGETAG_METRICS_PORT: Prometheus metrics on a registry of their
own (no process defaults), readiness and liveness.

    /metrics   the worker's metrics
    /readyz    200 {"status": "ready"} while the models are loaded and Redis answers; otherwise 503
               with "loading", "redis_unreachable" or "failed" (the models did not load: the
               process is exiting)
    /healthz   200 while the process is up
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from inference.batching import BatchStats
from inference.worker import OUTCOMES
from service.build import BuildInfo
from service.settings import ConfigurationError

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MODEL_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """A `WorkerObserver` that exports what the worker reports, and says whether it is ready."""

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
        self._queue_depth = Gauge(
            "imagetag_worker_queue_depth",
            "Jobs on the Redis stream (queued or in progress) when this worker last answered a batch",
            registry=self.registry,
        )
        # Plain flags, set on the worker's event loop and read by the HTTP threads.
        self.models_loaded = False
        self._serving = False
        self._failed = False

    def describe_build(self, version: str, models: str) -> None:
        """`imagetag_build_info`: the version, and the digests of this worker's weights."""
        self.registry.register(BuildInfo(version, lambda: models))

    def loaded(self) -> None:
        self.models_loaded = True

    def batch(self, stats: BatchStats) -> None:
        self._batches.inc()
        self._batch_size.observe(stats.size)
        self._model_seconds.observe(stats.model_s)
        self._queue_depth.set(stats.queue_depth)

    def jobs(self, outcome: str, count: int) -> None:
        self._jobs.labels(outcome).inc(count)

    def up(self, serving: bool) -> None:
        self._serving = serving
        self._up.set(1 if serving else 0)

    def failed(self) -> None:
        """The models could not be loaded."""
        self._failed = True

    def readiness(self) -> tuple[bool, str]:
        if self._failed:
            return False, "failed"
        if not self.models_loaded:
            return False, "loading"
        if not self._serving:
            return False, "redis_unreachable"
        return True, "ready"

    def serve(self, host: str, port: int) -> None:
        """Serves /metrics, /readyz and /healthz on a daemon thread for the life of the process."""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("Server", (_Server,), {"address_family": family})
            server = make_server(host, port, self._app(), server_class, handler_class=_QuietHandler)
        except OSError as error:
            raise ConfigurationError(
                f"IMAGETAG_METRICS_PORT: cannot listen on {host}:{port} ({error.strerror or error})"
            ) from None
        threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()

    def _app(self) -> Callable:
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/readyz":
                ready, status = self.readiness()
                return _json(start_response, "200 OK" if ready else "503 Service Unavailable", {"status": status})
            if path == "/healthz":
                return _json(start_response, "200 OK", {"status": "ok"})
            return _json(start_response, "404 Not Found", {"error": f"no {path} here: /metrics, /readyz, /healthz"})

        return app


def _json(start_response: Callable, status: str, body: dict) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe left hanging must not keep the process from exiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass  # a probe every few seconds is not news
