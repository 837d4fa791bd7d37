"""The worker's Prometheus exporter: what the worker reports, as metrics."""

from __future__ import annotations

from inference.batching import BatchStats
from service.worker_metrics import WorkerMetrics


def test_reports_become_metrics_and_every_outcome_exists_from_the_start():
    metrics = WorkerMetrics()
    sample = metrics.registry.get_sample_value
    assert sample("imagetag_worker_jobs_total", {"outcome": "expired"}) == 0
    assert sample("imagetag_worker_failed_batches_total") == 0
    metrics.failed_batches.inc()  # as the worker's models do (engine_factory, tests/service/test_assembly.py)
    assert sample("imagetag_worker_failed_batches_total") == 1
    metrics.up(True)
    metrics.batch(BatchStats(size=3, queue_wait_s=(0.1, 0.2, 0.3), model_s=0.4, queue_depth=0))
    metrics.jobs("tagged", 3)
    assert sample("imagetag_worker_up") == 1
    assert sample("imagetag_worker_batches_total") == 1
    assert sample("imagetag_worker_batch_size_sum") == 3
    assert sample("imagetag_worker_model_seconds_sum") == 0.4
    assert sample("imagetag_worker_jobs_total", {"outcome": "tagged"}) == 3
    metrics.up(False)
    assert sample("imagetag_worker_up") == 0
