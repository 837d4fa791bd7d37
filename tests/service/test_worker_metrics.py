"""The worker's Prometheus exporter and probes: what the worker reports, as metrics and readiness."""

from __future__ import annotations

import socket

import pytest
import requests

from inference.batching import BatchStats
from service.settings import ConfigurationError
from service.worker_metrics import WorkerMetrics
from tests.conftest import free_port


def test_reports_become_metrics_and_every_outcome_exists_from_the_start():
    metrics = WorkerMetrics()
    sample = metrics.registry.get_sample_value
    assert sample("imagetag_worker_jobs_total", {"outcome": "expired"}) == 0
    assert sample("imagetag_worker_failed_batches_total") == 0
    metrics.failed_batches.inc()  # as the worker's models do (engine_factory, tests/service/test_assembly.py)
    assert sample("imagetag_worker_failed_batches_total") == 1
    metrics.up(True)
    metrics.batch(BatchStats(size=3, queue_wait_s=(0.1, 0.2, 0.3), model_s=0.4, queue_depth=7))
    metrics.jobs("tagged", 3)
    assert sample("imagetag_worker_up") == 1
    assert sample("imagetag_worker_batches_total") == 1
    assert sample("imagetag_worker_batch_size_sum") == 3
    assert sample("imagetag_worker_model_seconds_sum") == 0.4
    assert sample("imagetag_worker_queue_depth") == 7
    assert sample("imagetag_worker_jobs_total", {"outcome": "tagged"}) == 3
    metrics.up(False)
    assert sample("imagetag_worker_up") == 0


def test_readyz_healthz_and_metrics_over_http():
    metrics = WorkerMetrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)

    def readyz() -> tuple[int, dict]:
        response = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        return response.status_code, response.json()

    assert readyz() == (503, {"status": "loading"})
    metrics.loaded()
    assert readyz() == (503, {"status": "redis_unreachable"})  # loaded, Redis not heard from yet
    metrics.up(True)
    assert readyz() == (200, {"status": "ready"})
    metrics.up(False)  # a Redis call failed
    assert readyz() == (503, {"status": "redis_unreachable"})
    metrics.failed()
    assert readyz() == (503, {"status": "failed"})
    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    scrape = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert scrape.status_code == 200 and "imagetag_worker_up 0.0" in scrape.text
    # Only these three: a probe pointed at a wrong path must fail, not get the metrics page.
    assert requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 404

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigurationError, match=r"IMAGETAG_METRICS_PORT: cannot listen on 127\.0\.0\.1:\d+"):
            WorkerMetrics().serve("127.0.0.1", taken.getsockname()[1])
